"""Sparse attention: each chosen attention site becomes plan → block-sparse attention.

    attention(q, k, v, mask)   ⟶   counts, indices = block_plan(q, k, mask, ...)      estimate + select
                                    block_sparse_attention(q, k, v, mask, counts, indices, ...)

The plan is computed per input, per batch row and per KV head (grouped-query heads share it, K/V are
never repeated). Both nodes keep the site's output contract, so nothing around the site changes.
Sequences shorter than ``min_seq_len`` run dense inside the same nodes, so one graph serves every length.
"""
from __future__ import annotations

import dataclasses
import operator

import torch

from dynasparse.config import BaseConfig, config_type
from dynasparse.errors import DynasparseError
from dynasparse.ir.analysis import AttentionSite, GraphAnalysis
from dynasparse.ir.nodes import bound_args, copy_meta, fake, propagate_fake_values
from dynasparse.ir.ops import BLOCK_PLAN, BLOCK_SPARSE_ATTENTION, TOKEN_SPARSE_ATTENTION
from dynasparse.kernels.estimators import ESTIMATORS
from dynasparse.kernels.sparse_attention import block_layout, select_blocks
from dynasparse.registry import PassResult


@config_type
@dataclasses.dataclass
class SparseAttentionConfig(BaseConfig):
    """Attend only to the KV blocks that matter, chosen per input (MInference / SeerAttention / FlexPrefill).

    How many blocks each query block keeps: exactly one of ``keep_ratio`` (a share of its causally valid
    blocks), ``top_k`` (a number of blocks) or ``mass`` (the fewest blocks holding that share of the
    estimated attention mass). ``sink_blocks`` leading blocks and ``local_blocks`` blocks ending at the
    diagonal are always kept and count toward the amount. ``estimator`` scores blocks: ``"pooled"``
    (mean-pooled Q · K), ``"vertical_slash"`` (the last ``window`` queries' real attention, read along
    columns and diagonals), ``"antidiagonal"`` (antidiagonal sums of 8x8 tiles of the real scores,
    XAttention: the closest to the true plan on SmolLM2) or ``"streaming"`` (the blocks nearest the
    diagonal: StreamingLLM's A-shape).
    Sequences with fewer than ``min_seq_len`` keys run dense. ``layers``: attention layers to sparsify.
    ``decode_keep``: decode steps (fewer queries than a block) read only this share of the keys per KV
    head, the ones their queries weigh most (query-aware selection, TokenSelect): with a KV cache the cache
    keeps its tokens and each step picks what to read. Set alone, prefill stays dense (``keep_ratio=1``).
    ``token_keep`` (instead of the block selectors): Token Sparse Attention. Each KV head keeps this share
    of the tokens, as queries and as keys (those its ``window`` probe queries weigh most, and the probes),
    attends among them, and the other tokens get nothing from that head (the residual carries them). For a
    model called whole (prefill, a DiT step); it does not compose with a KV cache or exit gates.
    """

    keep_ratio: float | None = None
    top_k: int | None = None
    mass: float | None = None
    estimator: str = "pooled"
    block_size: int = 64
    sink_blocks: int = 1
    local_blocks: int = 1
    min_seq_len: int = 1024
    window: int = 64
    decode_keep: float = 1.0
    token_keep: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        self.check_range("decode_keep", 0.0, 1.0, low_open=True)
        given = [f for f in ("keep_ratio", "top_k", "mass") if getattr(self, f) is not None]
        if not given and self.decode_keep < 1.0:  # query-aware decode alone: a dense prefill
            self.keep_ratio, given = 1.0, ["keep_ratio"]
        if self.token_keep is not None:
            self.check_range("token_keep", 0.0, 1.0, low_open=True)
            extra = given + (["decode_keep"] if self.decode_keep < 1.0 else [])
            if extra:
                raise DynasparseError(f"{name}: token_keep selects tokens instead of blocks; leave keep_ratio, "
                                      f"top_k, mass and decode_keep out (got {extra})")
        elif len(given) != 1:
            raise DynasparseError(f"{name}: set exactly one of keep_ratio (share of each row's blocks), top_k "
                                  f"(blocks per row) or mass (share of the estimated attention mass); got "
                                  f"{given or 'none'}")
        if self.keep_ratio is not None:
            self.check_range("keep_ratio", 0.0, 1.0, low_open=True)
        if self.mass is not None:
            self.check_range("mass", 0.0, 1.0, low_open=True)
        if self.estimator not in ESTIMATORS:
            raise DynasparseError(f"{name}.estimator={self.estimator!r}; expected one of {tuple(ESTIMATORS)}")
        if not isinstance(self.block_size, int) or self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise DynasparseError(f"{name}.block_size={self.block_size!r}: blocks are kernel tiles, so the size "
                                  "must be a power of two >= 16 (64 or 128 are the usual choices)")
        for field_name in ("sink_blocks", "local_blocks", "min_seq_len"):
            self.check_int(field_name, 0)
        if not isinstance(self.window, int) or self.window < 1:
            raise DynasparseError(f"{name}.window={self.window!r} must be an int >= 1 (probe queries)")
        if self.top_k is not None:
            self.check_int("top_k", 1)
            if self.top_k * self.block_size > max(self.min_seq_len, self.block_size):
                raise DynasparseError(
                    f"{name}.top_k={self.top_k} blocks of {self.block_size} tokens is more than a sequence of "
                    f"min_seq_len={self.min_seq_len} tokens has; set min_seq_len >= "
                    f"{self.top_k * self.block_size} or lower top_k")

    @property
    def selector(self) -> str:
        return "keep_ratio" if self.keep_ratio is not None else "topk" if self.top_k is not None else "mass"

    @property
    def amount(self) -> float:
        return float(self.keep_ratio if self.keep_ratio is not None else self.top_k or self.mass)


class SparseAttentionPass:
    name = "sparse_attention"

    def __init__(self, config: SparseAttentionConfig):
        self.config = config

    # -- find sites ---------------------------------------------------------------------------------------
    def _chosen(self, analysis: GraphAnalysis) -> list[AttentionSite]:
        chosen = [site for site in analysis.sites if self.config.applies_to(site.layer) and not site.sparse]
        if not chosen:
            layers = sorted({s.layer for s in analysis.sites})
            raise DynasparseError(f"SparseAttentionConfig.layers={self.config.layers} matches no attention "
                                  f"layer; the model has layers {layers}")
        return chosen

    # -- decide ---------------------------------------------------------------------------------------------
    def _dense_at_example(self, site: AttentionSite) -> str | None:
        """Why the example runs dense at this site (None: it runs sparse). ``top_k`` never exceeds the
        blocks of a sparse-length input: the config requires ``min_seq_len >= top_k * block_size``."""
        kv_len = site.example_shape[2]
        if kv_len < self.config.min_seq_len:
            return (f"dense at the example's {kv_len} keys (< min_seq_len={self.config.min_seq_len}); "
                    "sparse on longer inputs")
        return None

    def _kept_share(self, site: AttentionSite) -> float | None:
        """Share of the valid blocks kept at the example shape, counted by the op's own selector on the
        example's block layout (None: ``mass`` depends on the data)."""
        _, q_len, kv_len = site.example_shape
        if kv_len < self.config.min_seq_len:
            return 1.0
        if self.config.selector == "mass":
            return None
        c = self.config
        valid, forced = block_layout(q_len, kv_len, c.block_size, site.causal, c.sink_blocks, c.local_blocks,
                                     torch.device("cpu"))
        counts, _ = select_blocks(torch.zeros(valid.shape), valid, forced, c.selector, c.amount)
        return counts.sum().item() / valid.sum().item()

    # -- rewrite --------------------------------------------------------------------------------------------
    def apply(self, gm: torch.fx.GraphModule, analysis: GraphAnalysis) -> PassResult:
        result = PassResult(self.name)
        c = self.config
        for site in self._chosen(analysis):
            if c.token_keep is not None:
                self._rewrite_tokens(gm, site, result)
                continue
            dense_reason = self._dense_at_example(site)
            args = bound_args(site.node)
            # A mask built from position comparisons (Hugging Face passes causality as a tensor) is causal:
            # saying so lets plans skip the blocks past the diagonal and the kernels take their causal paths.
            is_causal = True if site.causal else args["is_causal"]
            with gm.graph.inserting_before(site.node):
                plan = gm.graph.call_function(BLOCK_PLAN, (
                    args["q"], args["k"], args["mask"], is_causal, args["scale"], c.block_size,
                    c.estimator, c.selector, c.amount, c.sink_blocks, c.local_blocks, c.min_seq_len, c.window))
                counts = gm.graph.call_function(operator.getitem, (plan, 0))
                indices = gm.graph.call_function(operator.getitem, (plan, 1))
                sparse = gm.graph.call_function(BLOCK_SPARSE_ATTENTION, (
                    args["q"], args["k"], args["v"], args["mask"], counts, indices, is_causal,
                    args["scale"], c.block_size, c.min_seq_len, c.decode_keep))
            for node in (plan, counts, indices, sparse):
                copy_meta(site.node, node)
            site.node.replace_all_uses_with(sparse)
            gm.graph.erase_node(site.node)
            result.num_matches += 1
            kept = self._kept_share(site)
            share = "data-dependent share" if kept is None else f"{kept:.0%} of the blocks at the example"
            decode = f", decode steps read {c.decode_keep:.0%} of the keys" if c.decode_keep < 1.0 else ""
            result.applied.append(f"layer {site.layer}: {c.estimator} / {c.selector} {c.amount:g}, "
                                  f"blocks of {c.block_size}, {share}{decode}")
            if dense_reason:
                result.notes.append(f"sparse_attention: layer {site.layer}: {dense_reason}")
            if kept is not None:
                batch, q_len, kv_len = site.example_shape
                result.flops_saved += (1.0 - kept) * site.flops(batch, q_len, kv_len)
        propagate_fake_values(gm)
        return result

    def _rewrite_tokens(self, gm: torch.fx.GraphModule, site: AttentionSite, result: PassResult) -> None:
        """Token Sparse Attention at one site; a site it cannot serve stays dense and the report says why."""
        c, args = self.config, bound_args(site.node)
        mask = fake(args["mask"]) if args["mask"] is not None else None
        why = ("cross-attention (keys from another sequence)" if site.q_len != site.kv_len else
               "a mask that differs per head" if mask is not None and mask.dim() == 4 and mask.shape[1] != 1 else None)
        if why:
            result.left_dense[site.node.name] = f"token_keep: {why}"
            return
        with gm.graph.inserting_before(site.node):
            sparse = gm.graph.call_function(TOKEN_SPARSE_ATTENTION, (
                args["q"], args["k"], args["v"], args["mask"], True if site.causal else args["is_causal"],
                args["scale"], c.token_keep, c.window, c.min_seq_len))
        copy_meta(site.node, sparse)
        site.node.replace_all_uses_with(sparse)
        gm.graph.erase_node(site.node)
        result.num_matches += 1
        batch, q_len, kv_len = site.example_shape
        kept = 1.0 if kv_len < c.min_seq_len else c.token_keep
        result.applied.append(f"layer {site.layer}: tokens {c.token_keep:g} per KV head, "
                              f"{kept:.0%} of the tokens at the example")
        result.flops_saved += (1.0 - kept ** 2) * site.flops(batch, q_len, kv_len)

