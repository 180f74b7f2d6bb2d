"""Token merging: fewer tokens per block, between attention and MLP, with a dense unmerge at the end.

    block i:  x ─ attention ─ (+x) ─ mid ──────────────────── MLP ─ (+) ─ out
                                      └─ merge_tokens(mid, keys_i, size, source) ┘  → fewer tokens from here on
    block j>i: attention(q, k, v, mask = merge_bias(size))   (log-size bias: proportional attention + padding)
    after the last block:  unmerge(out, source) → original length for the head / dense outputs

``mid`` is found on the graph: the residual-stream node after the attention that dominates the block
output and forks into the MLP and the residual (works for pre-norm and post-norm blocks alike).
Only bidirectional (encoder) attention is merged; causal sites stay dense and are reported.
"""
from __future__ import annotations

import dataclasses
import operator

import networkx as nx
import torch
from torch.fx import Node
from torch.utils._pytree import tree_leaves

from dynasparse.config import BaseConfig, as_tuple, config_type
from dynasparse.errors import DynasparseError
from dynasparse.ir.analysis import AttentionSite, Block, GraphAnalysis
from dynasparse.ir.nodes import (bound_args, copy_graph, fake, hint, input_dim, module_paths,
                                 propagate_fake_values, repoint_token_count)
from dynasparse.ir.ops import CLS_IMPORTANCE, MERGE_BIAS, MERGE_INIT, MERGE_TOKENS, UNMERGE
from dynasparse.kernels.token_merge import merged_capacity, most_merges, recording_edge_scores
from dynasparse.passes.base import calibration_call
from dynasparse.plans import (MERGE_GATE, STREAM_STATE, TIMESTEP_BANDS, MergeGate, StreamState, TimestepBands,
                              band_covering)
from dynasparse.registry import PassResult


@config_type
@dataclasses.dataclass
class TokenMergeConfig(BaseConfig):
    """Merge redundant tokens between attention and MLP of encoder blocks (ToMe / DyMU / EViT family).

    How many: ``r`` tokens per block (an int, or one int per merged block; a row merges at most what it
    can, half of its unprotected tokens, as in ToMe) or ``keep_ratio``, the share of tokens left after
    the last merge (spread geometrically over the blocks). ``schedule="decreasing"``
    ramps a constant ``r`` from 2r down to 0 (ToMe's decreasing schedule, same total).
    Which: ``mode="bipartite"`` merges the most similar pairs (cosine of ``metric``: the keys averaged
    over heads, or the ``hidden`` state); ``"threshold"`` merges pairs above a per-block similarity
    ``threshold`` (None: calibrated from ``optimize(..., calibration=...)`` to hit the same average),
    always at least ``min_merge_fraction`` of the scheduled merges so buffers stay fixed-size;
    ``"prune"`` drops the least-attended tokens (CLS attention), fused into one token when ``fuse_pruned``.
    ``protect``: real-token positions never merged (CLS). ``proportional_attention``: keys of merged
    tokens get log(size) added to their logits. ``min_tokens`` (with keep_ratio; default 32): each row
    merges only a share of its tokens beyond the first ``min_tokens``, so short inputs (queries) stay exact.
    ``dense_below``: a call whose batch holds fewer mergeable tokens than this (batch size × (padded
    length − ``min_tokens``)) runs the graph as it was before merging. Each merge has a fixed cost
    (many small ops), so small batches lose time unless they skip merging.
    ``layers``: blocks to merge after (default: all but the first while ``dense_first``: the first
    block's tokens are not contextual yet, so their similarities say little).
    ``timestep_schedule`` (diffusion transformers; FlexDiT, DyDiT): instead of one keep ratio, pairs
    ``(lowest timestep, keep_ratio)``, one per band of denoising timesteps, e.g. ``((0, 0.5), (400, 0.75),
    (800, 1.0))``: noisy steps (high t) keep more tokens, late steps fewer; the lowest band starts at 0 and
    every timestep lies below ``num_timesteps`` (the sampler's training steps). The graph reads the model
    input ``timestep_input`` and picks the band itself (torch.cond), so one capture serves every step; a
    batch of mixed timesteps runs the band of its noisiest row. A band's keep ratio ``None`` is calibrated:
    the lowest of ``KEEP_LADDER`` whose output on the calibration batches of that band stays within
    ``max_output_error`` (relative L2 distance to the dense output) of the dense graph's.
    The defaults (hidden-state metric, first block dense, 32 tokens left whole) hold embedding fidelity on
    real text (``benchmarks/token_merge.py``); ``TokenMergeConfig.tome(...)`` is plain ToMe.
    """

    r: int | tuple[int, ...] | None = None
    keep_ratio: float | None = None
    schedule: str = "constant"
    mode: str = "bipartite"
    metric: str = "hidden"
    protect: tuple[int, ...] = (0,)
    proportional_attention: bool = True
    threshold: float | tuple[float, ...] | None = None
    min_merge_fraction: float = 0.5
    fuse_pruned: bool = True
    min_tokens: int | None = None
    dense_below: int = 0
    dense_first: bool = True
    timestep_schedule: tuple[tuple[float, float], ...] | None = None
    timestep_input: str = "timestep"
    num_timesteps: int = 1000
    max_output_error: float = 0.05

    @classmethod
    def tome(cls, **settings) -> TokenMergeConfig:
        """Plain ToMe (Bolya et al.): the keys as the metric, every block merged, no tokens left whole;
        ``settings``: ``r`` or ``keep_ratio`` and anything else to change."""
        return cls(**{"metric": "keys", "dense_first": False, "min_tokens": 0, **settings})

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if self.timestep_schedule is not None:
            self._check_timestep_schedule()
        elif (self.r is None) == (self.keep_ratio is None):
            raise DynasparseError(f"{name}: set exactly one of r (tokens merged per block) or keep_ratio "
                                  "(share of tokens left after the last block)")
        if isinstance(self.r, (list, tuple)):
            self.r = tuple(self.r)
        if self.r is not None and any(not isinstance(v, int) or v < 0 for v in as_tuple(self.r)):
            raise DynasparseError(f"{name}.r={self.r!r} must be a non-negative int or a list of them")
        if self.keep_ratio is not None:
            self.check_range("keep_ratio", 0.0, 1.0, low_open=True)
        for field_name, allowed in (("schedule", ("constant", "decreasing")),
                                    ("mode", ("bipartite", "threshold", "prune")),
                                    ("metric", ("keys", "hidden"))):
            if getattr(self, field_name) not in allowed:
                raise DynasparseError(f"{name}.{field_name}={getattr(self, field_name)!r}; expected one of {allowed}")
        if self.schedule == "decreasing" and not isinstance(self.r, int):
            raise DynasparseError(f"{name}: schedule='decreasing' ramps a constant r; give r as an int")
        self.protect = tuple(self.protect)
        if any(not isinstance(p, int) or p < 0 for p in self.protect):
            raise DynasparseError(f"{name}.protect={self.protect!r} must be token positions >= 0")
        self.check_range("min_merge_fraction", 0.0, 1.0)
        by_share = self.keep_ratio is not None or self.timestep_schedule is not None
        if self.min_tokens is None:
            self.min_tokens = 32 if by_share else 0
        self.check_int("min_tokens", 0)
        self.check_int("dense_below", 0)
        if self.min_tokens and not by_share:
            raise DynasparseError(f"{name}: min_tokens goes with keep_ratio (a share of the tokens beyond it)")
        if self.threshold is not None:
            self.threshold = self.threshold if isinstance(self.threshold, float) else tuple(self.threshold)
            if any(not -1.0 <= t <= 1.0 for t in as_tuple(self.threshold)):
                raise DynasparseError(f"{name}.threshold={self.threshold!r}: cosine thresholds lie in [-1, 1]")
            if self.mode != "threshold":
                raise DynasparseError(f"{name}: threshold is only used with mode='threshold'")

    def _check_timestep_schedule(self) -> None:
        name = type(self).__name__
        if self.r is not None or self.keep_ratio is not None:
            raise DynasparseError(f"{name}: timestep_schedule gives the keep ratio of each band of timesteps; "
                                  "leave r and keep_ratio unset")
        if self.mode == "threshold" or self.dense_below:
            raise DynasparseError(f"{name}: timestep_schedule picks a band per call from the timestep; use "
                                  "mode='bipartite' or 'prune' and leave dense_below at 0")
        self.check_int("num_timesteps", 1)
        self.check_range("max_output_error", 0.0, 1.0, low_open=True)
        try:
            bands = tuple(sorted((float(t), None if keep is None else float(keep))
                                 for t, keep in self.timestep_schedule))
        except (TypeError, ValueError):
            raise DynasparseError(f"{name}.timestep_schedule={self.timestep_schedule!r}: give pairs (lowest "
                                  "timestep, keep_ratio), e.g. ((0, 0.5), (500, 1.0))") from None
        outside = [t for t, _ in bands if not 0 <= t < self.num_timesteps]
        if outside:
            raise DynasparseError(f"{name}.timestep_schedule names timesteps {outside} outside the sampler's "
                                  f"0..{self.num_timesteps - 1} (num_timesteps={self.num_timesteps})")
        if not bands or bands[0][0] != 0:
            raise DynasparseError(f"{name}.timestep_schedule starts at t={bands[0][0] if bands else None}: "
                                  "timesteps below it would have no band; start the lowest band at 0")
        if len({t for t, _ in bands}) != len(bands):
            raise DynasparseError(f"{name}.timestep_schedule names a timestep twice: {self.timestep_schedule!r}")
        if any(keep is not None and not 0.0 < keep <= 1.0 for _, keep in bands):
            raise DynasparseError(f"{name}.timestep_schedule: keep ratios lie in (0, 1] (None: calibrated), got "
                                  f"{[keep for _, keep in bands]}")
        self.timestep_schedule = bands

    @property
    def calibrates_schedule(self) -> bool:
        return self.timestep_schedule is not None and any(keep is None for _, keep in self.timestep_schedule)

    def sparsest_keep(self, num_blocks: int) -> float | None:
        """The keep ratio the captured graph is rewritten for: with a schedule, its lowest band's (a band to
        calibrate may go as low as the ladder allows over ``num_blocks`` merges of at most half)."""
        if self.timestep_schedule is not None:
            lowest = min(k for k in KEEP_LADDER if k >= 0.5 ** num_blocks)
            return min(lowest if keep is None else keep for _, keep in self.timestep_schedule)
        return self.keep_ratio


KEEP_LADDER = (0.25, 0.35, 0.5, 0.7, 1.0)  # the keep ratios a calibrated band of timesteps tries, lowest first
RATIO_ARG = 6  # merge_tokens(x, metric, size, source, importance, r, ratio_milli, ...): a band's amount


def set_merge_amounts(graph: torch.fx.Graph, amounts: dict[str, int]) -> None:
    """Give the merge nodes named in ``amounts`` that amount (``ratio_milli``): one band's graph."""
    for node in graph.nodes:
        if node.name in amounts:
            node.update_arg(RATIO_ARG, amounts[node.name])


def _input_dim(gm: torch.fx.GraphModule, size: int | torch.SymInt, what: str) -> tuple[int | None, int]:
    """Where a call's ``size`` can be read: a dimension of an input, or the capture-time constant."""
    if not isinstance(size, torch.SymInt):
        return None, int(size)
    found = input_dim(gm, size)
    if found is None:
        raise DynasparseError(f"TokenMergeConfig.dense_below reads the {what} from the inputs, but no input has "
                              f"it as a dimension (it is {size}); leave dense_below at 0 for this model")
    return found


def _timestep_input(gm: torch.fx.GraphModule, name: str) -> int:
    """Which flat input carries the timestep: the placeholder named ``name`` (Dynamo spells it ``l_name_``)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for index, node in enumerate(placeholders):
        if node.name in (name, f"l_{name}_", f"L_{name}_") and isinstance(fake(node), torch.Tensor):
            return index
    seen = ", ".join(n.name for n in placeholders[:12]) + (", ..." if len(placeholders) > 12 else "")
    raise DynasparseError(f"TokenMergeConfig.timestep_schedule reads the timestep from the input "
                          f"{name!r}, and the captured graph has no tensor input of that name (inputs seen: "
                          f"{seen}); set timestep_input= to the name of the model's timestep argument and "
                          "pass it as a tensor")


def _block_members(gm: torch.fx.GraphModule, block: Block) -> list[Node]:
    return [n for n in gm.graph.nodes if block.module in module_paths(n)]


def _self_attention(site: AttentionSite) -> bool:
    """Keys from the queries' own stream (a cross-attention reads another sequence, e.g. text)."""
    return site.q_len == site.kv_len


def find_mid(gm: torch.fx.GraphModule, block: Block, site_node: Node) -> Node | None:
    """The residual-stream node between the block's attention and its MLP (see module docstring)."""
    if block.input is None or block.output is None:
        return None
    members = _block_members(gm, block)
    inside = set(members) | {block.input}
    graph = nx.DiGraph()
    graph.add_nodes_from(inside)
    graph.add_edges_from((n, u) for n in inside for u in n.users if u in inside)
    reachable = nx.descendants(graph, block.input) | {block.input}
    if block.output not in reachable:
        return None
    dominators = nx.immediate_dominators(graph.subgraph(reachable), block.input)
    chain, node = [], block.output
    while node is not block.input:
        chain.append(node)
        node = dominators[node]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    shape = fake(block.output).shape
    for candidate in sorted(chain, key=order.get):
        if order[candidate] <= order[site_node] or fake(candidate) is None or fake(candidate).shape != shape:
            continue
        if sum(1 for u in candidate.users if u in inside) >= 2:
            return candidate
    return None


def _schedule(config: TokenMergeConfig, num_blocks: int, keep_ratio: float | None = None) -> list[tuple[int, int]]:
    """(r, ratio_milli) per merged block; ratio_milli < 0 means 'use r'. ``keep_ratio``: one band's."""
    keep_ratio = config.sparsest_keep(num_blocks) if keep_ratio is None else keep_ratio
    if keep_ratio is not None:
        fraction = 1.0 - keep_ratio ** (1.0 / num_blocks)
        if fraction > 0.5:
            raise DynasparseError(
                f"TokenMergeConfig keep ratio {keep_ratio} over {num_blocks} blocks needs "
                f"{fraction:.0%} of the tokens merged per block; at most 50% can merge in one block. "
                "Raise the keep ratio or merge in more blocks.")
        return [(config.min_tokens, round(fraction * 1000))] * num_blocks
    if isinstance(config.r, tuple):
        if len(config.r) != num_blocks:
            raise DynasparseError(f"TokenMergeConfig.r has {len(config.r)} values for {num_blocks} merged "
                                  "blocks; give one per block or a single int")
        return [(r, -1) for r in config.r]
    if config.schedule == "decreasing":
        ramp = [round(2 * config.r * (1 - i / max(num_blocks - 1, 1))) for i in range(num_blocks)]
        return [(r, -1) for r in ramp]
    return [(config.r, -1)] * num_blocks


def _thresholds(config: TokenMergeConfig, num_blocks: int) -> list[float]:
    if config.threshold is None:
        return [1.0] * num_blocks  # calibrated later; 1.0 merges only the guaranteed floor
    if isinstance(config.threshold, float):
        return [config.threshold] * num_blocks
    if len(config.threshold) != num_blocks:
        raise DynasparseError(f"TokenMergeConfig.threshold has {len(config.threshold)} values for "
                              f"{num_blocks} merged blocks")
    return list(config.threshold)


class TokenMergePass:
    name = "token_merge"

    def __init__(self, config: TokenMergeConfig):
        self.config = config
        self.uses_calibration = (config.mode == "threshold" and config.threshold is None) or config.calibrates_schedule
        self.calibration = None

    # -- find sites ---------------------------------------------------------------------------------------
    def _eligible(self, gm: torch.fx.GraphModule, analysis: GraphAnalysis, result: PassResult
                  ) -> list[tuple[Block, Node, Node]]:
        chosen = []
        missing = sorted(set(self.config.layers or ()) - {block.index for block in analysis.blocks})
        if missing:
            raise DynasparseError(f"TokenMergeConfig.layers names blocks {missing}; the model has blocks "
                                  f"0..{len(analysis.blocks) - 1}")
        if not analysis.blocks:
            for site in analysis.sites:
                result.left_dense[site.node.name] = "no block structure found (attention outside indexed modules)"
            return chosen
        for block in analysis.blocks:
            sites = [analysis.sites[i] for i in block.sites]
            if not self.config.applies_to(block.index):
                continue
            label = f"block {block.index} ({block.module})"
            if self.config.layers is None and self.config.dense_first and block.index == 0:
                result.left_dense[label] = "first block: dense by default (TokenMergeConfig.dense_first)"
            elif len(own := [site for site in sites if _self_attention(site)]) != 1:
                result.left_dense[label] = (f"{len(own)} self-attention sites in one block; merging needs one "
                                            f"(beside any cross-attention)")
            elif own[0].sparse:
                result.left_dense[label] = ("block-sparse attention already planned here; list TokenMergeConfig "
                                            "before SparseAttentionConfig")
            elif own[0].causal:
                result.left_dense[label] = "causal attention: merging would mix earlier and later tokens"
            elif (mid := find_mid(gm, block, sites[-1].node)) is None:
                result.left_dense[label] = "no residual-stream node between attention and MLP"
            elif own[0].q_len != str(stream := fake(mid).shape[1]):
                result.left_dense[label] = (f"attention reads {own[0].example_shape[1]} tokens at the example "
                                            f"where the residual stream holds {hint(stream)} (a joint attention "
                                            f"over concatenated streams, as in SD3's MMDiT): merging needs "
                                            f"attention over the stream's own tokens")
            else:  # merged after the block's last attention (a cross-attention's queries are the stream's)
                chosen.append((block, own[0].node, mid))
        for block in analysis.blocks[:-1]:
            outside = [u for u in (block.output.users if block.output else ())
                       if analysis.blocks[block.index + 1].module not in module_paths(u)]
            if chosen and block.index >= chosen[0][0].index and outside:
                raise DynasparseError(
                    f"token merging changes the length of hidden states that {outside[0].name} reads after "
                    f"block {block.index} (e.g. output_hidden_states=True); capture without them")
        return chosen

    # -- decide ---------------------------------------------------------------------------------------------
    @property
    def _r_min_milli(self) -> int:
        return round(self.config.min_merge_fraction * 1000)

    def _capacity(self, length: int, r: int, ratio_milli: int) -> int:
        """Tokens left after one merge of ``length`` tokens (the op's own capacity formula)."""
        return int(merged_capacity(length, r, ratio_milli, self.config.mode, self.config.fuse_pruned,
                                   self._r_min_milli, len(self.config.protect)))

    def _check_protect(self, length: int) -> None:
        protect = self.config.protect
        if len(protect) > length or any(p >= length for p in protect):
            raise DynasparseError(f"TokenMergeConfig.protect={protect} names tokens beyond the example "
                                  f"sequence of {length} tokens")

    def _capped(self, length: int, r: int, ratio_milli: int) -> str:
        """Where a constant ``r`` asks more than a row of ``length`` tokens can merge: the report's words."""
        most = most_merges(length - len(self.config.protect), self.config.mode)
        if ratio_milli >= 0 or r <= most:
            return ""
        return f" (capped at {most}: {length - len(self.config.protect)} unprotected tokens)"

    # -- rewrite --------------------------------------------------------------------------------------------
    def apply(self, gm: torch.fx.GraphModule, analysis: GraphAnalysis) -> PassResult:
        result = PassResult(self.name)
        chosen = self._eligible(gm, analysis, result)
        if not chosen:
            return result
        length_symbol = fake(chosen[0][2]).shape[1]
        length = hint(length_symbol)
        schedule = _schedule(self.config, len(chosen))
        timestep_at = (_timestep_input(gm, self.config.timestep_input)
                       if self.config.timestep_schedule is not None else None)
        self._check_protect(length)
        dense_graph = copy_graph(gm.graph) if self.config.dense_below else None
        merged_hidden: list[Node] = []  # the hidden state right after each merge
        merge_nodes: list[str] = []
        thresholds = _thresholds(self.config, len(chosen))
        if self.config.mode == "prune" and any(s.num_heads != s.num_kv_heads for s in analysis.sites):
            raise DynasparseError("TokenMergeConfig(mode='prune') needs as many key heads as query heads")

        size, source = self._insert_init(gm, analysis)
        bias = None
        source_after: dict[int, str] = {}  # the merge source the stream has after each block
        merge_after = {block.index: (site, mid, step) for step, (block, site, mid) in enumerate(chosen)}
        example = length
        for block in analysis.blocks:
            if bias is not None:  # self-attention after a merge sees merged keys (cross-attention: other keys)
                for site in (analysis.sites[i] for i in block.sites if _self_attention(analysis.sites[i])):
                    site.node.args = site.node.args[:3] + (bias,) + site.node.args[4:]
            if block.index not in merge_after:
                if source is not None:
                    source_after[block.index] = source.name
                continue
            site, mid, step = merge_after[block.index]
            r, ratio_milli = schedule[step]
            x_new, size, source, bias = self._insert_merge(gm, site, mid, size, source, r, ratio_milli,
                                                           thresholds[step])
            merged_hidden.append(x_new)
            merge_nodes.append(x_new.args[0].name)
            kept = self._capacity(example, r, ratio_milli)
            result.applied.append(f"block {block.index}: {self._describe(r, ratio_milli, thresholds[step])}, "
                                  f"{example} → {kept} tokens at the example{self._capped(example, r, ratio_milli)}")
            example = kept
            source_after[block.index] = source.name
            result.num_matches += 1
        self._insert_unmerge(gm, analysis.blocks[-1].output, source)
        gm.meta.setdefault(STREAM_STATE, []).append(StreamState(source.name, source_after))
        self._repoint_lengths(gm, length_symbol, merged_hidden)
        if dense_graph is not None:
            batch_symbol = fake(chosen[0][2]).shape[0]
            gm.meta[MERGE_GATE] = MergeGate(dense_graph, _input_dim(gm, batch_symbol, "batch size"),
                                            _input_dim(gm, length_symbol, "sequence length"),
                                            self.config.min_tokens, self.config.dense_below)
            result.notes.append(f"token_merge: a batch with fewer than {self.config.dense_below} mergeable "
                                f"tokens (batch × (length − {self.config.min_tokens})) runs the dense graph")
        if timestep_at is not None:
            keeps = [keep for _, keep in self.config.timestep_schedule]
            if self.config.calibrates_schedule:
                keeps, note = self._calibrate_schedule(gm, merge_nodes)
                result.notes.append(note)
            result.notes.append(self._record_bands(gm, timestep_at, merge_nodes, keeps))
            example = length  # the graph now holds the sparsest band's amounts, calibrated or given
            for r, ratio_milli in _schedule(self.config, len(merge_nodes), min(keeps)):
                example = self._capacity(example, r, ratio_milli)
        elif self.uses_calibration:
            result.notes.append(self._calibrate_thresholds(gm))
        propagate_fake_values(gm)
        result.flops_saved = self._attention_flops_saved(analysis)
        result.notes.append(f"token_merge: {length} → {example} tokens after the last merge at the example "
                            f"({example / length:.0%} kept)")
        return result

    def _amounts(self, merge_nodes: list[str], keep: float) -> dict[str, int]:
        return {name: ratio_milli for name, (_, ratio_milli) in zip(merge_nodes, _schedule(self.config,
                                                                                           len(merge_nodes), keep))}

    def _set_amounts(self, gm: torch.fx.GraphModule, amounts: dict[str, int]) -> None:
        set_merge_amounts(gm.graph, amounts)
        gm.recompile()

    def _record_bands(self, gm: torch.fx.GraphModule, timestep_at: int, merge_nodes: list[str],
                      keeps: list[float]) -> str:
        """Each band's merge amounts, for the graph that picks the band (``passes/timestep_bands.py``); the
        graph itself keeps the sparsest band's."""
        bands = [(t, keep, self._amounts(merge_nodes, keep))
                 for (t, _), keep in zip(self.config.timestep_schedule, keeps)]
        self._set_amounts(gm, min(bands, key=lambda band: band[1])[2])
        gm.meta[TIMESTEP_BANDS] = TimestepBands(timestep_at, bands)
        described = ", ".join(f"t >= {t:g}: {keep:.0%}" for t, keep, _ in reversed(bands))
        return (f"token_merge: keep by timestep ({described} of the tokens after the last merge), picked in the "
                f"graph from input {self.config.timestep_input!r}")

    def _calibrate_schedule(self, gm: torch.fx.GraphModule, merge_nodes: list[str]) -> tuple[list[float], str]:
        """FlexDiT-style: each band to calibrate gets the lowest keep ratio of ``KEEP_LADDER`` whose output on
        the calibration batches of that band (by their noisiest row's timestep) stays within
        ``max_output_error`` of the dense output (relative L2 distance of the first output)."""
        name, bands = self.config.timestep_input, self.config.timestep_schedule
        if self.calibration is None:
            raise DynasparseError("TokenMergeConfig.timestep_schedule has bands with keep ratio None, which are "
                                  "calibrated: pass optimize(..., calibration=[batch, ...]) with inputs like "
                                  "example_kwargs at timesteps of every such band, or give the keep ratios")
        by_band: dict[int, list] = {}
        for index, batch in enumerate(self.calibration):
            args, kwargs = calibration_call(batch)
            if name not in kwargs:
                raise DynasparseError(f"calibration batch {index} has no {name!r}: pass dicts of keyword inputs "
                                      "as example_kwargs are")
            t = float(torch.as_tensor(kwargs[name]).max())
            by_band.setdefault(band_covering([low for low, _ in bands], t), []).append((args, kwargs))

        def outputs(amounts, calls) -> list[torch.Tensor]:
            self._set_amounts(gm, amounts)
            with torch.no_grad():
                return [tree_leaves(gm(*a, **k))[0].float() for a, k in calls]

        keeps, described = [], []
        for band, (low, keep) in enumerate(bands):
            if keep is not None:
                keeps.append(keep)
                continue
            calls = by_band.get(band)
            if not calls:
                raise DynasparseError(f"no calibration batch has its timesteps in the band t >= {low:g} (keep "
                                      "ratio None); add batches at those timesteps or give that band's keep ratio")
            dense = outputs(self._amounts(merge_nodes, 1.0), calls)
            for candidate in KEEP_LADDER:
                try:
                    amounts = self._amounts(merge_nodes, candidate)
                except DynasparseError:  # too few merged blocks for so low a ratio
                    continue
                error = sum(float((o - d).norm() / d.norm().clamp(min=1e-12))
                            for o, d in zip(outputs(amounts, calls), dense)) / len(calls)
                if error <= self.config.max_output_error or candidate == 1.0:
                    keeps.append(candidate)
                    described.append(f"t >= {low:g}: {candidate:.0%} (error {error:.1%}, {len(calls)} batches)")
                    break
        return keeps, (f"token_merge: keep ratios calibrated for an output error <= "
                       f"{self.config.max_output_error:.0%}: " + ", ".join(reversed(described)))

    def _calibrate_thresholds(self, gm: torch.fx.GraphModule) -> str:
        """DyMU-style: run the calibration batches with bipartite merging at the scheduled amount, record
        the similarity of each row's weakest merged edge per block, and use its mean as that block's
        threshold, so rows merge more or less than the schedule while the average stays near it."""
        if self.calibration is None:
            raise DynasparseError("TokenMergeConfig(mode='threshold', threshold=None) calibrates its thresholds: "
                                  "pass optimize(..., calibration=[batch, ...]) with inputs like example_kwargs, "
                                  "or give threshold=")
        merges = [n for n in gm.graph.nodes if n.target is MERGE_TOKENS]
        for node in merges:
            node.update_arg(8, "bipartite")
        gm.recompile()
        scores: list[list[torch.Tensor]] = [[] for _ in merges]
        batches = 0
        try:
            for batch in self.calibration:
                args, kwargs = calibration_call(batch)
                with torch.no_grad(), recording_edge_scores() as recorded:
                    try:
                        gm(*args, **kwargs)
                    except Exception as err:
                        raise DynasparseError(f"calibration batch {batches} does not fit the model "
                                              f"({type(err).__name__}: {err}); pass batches shaped like "
                                              "example_kwargs") from None
                for step, values in enumerate(recorded[:len(merges)]):
                    scores[step].append(values)
                batches += 1
        finally:
            for node in merges:
                node.update_arg(8, "threshold")
            gm.recompile()
        if not batches:
            raise DynasparseError("calibration data is empty; pass at least one batch")
        thresholds = []
        for node, values in zip(merges, scores):
            collected = torch.cat(values) if values else torch.empty(0)
            threshold = float(collected.mean()) if collected.numel() else 1.0
            node.update_arg(9, threshold)
            thresholds.append(threshold)
        gm.recompile()
        return (f"token_merge: thresholds calibrated on {batches} batches: "
                + ", ".join(f"{t:.3f}" for t in thresholds))

    def _describe(self, r: int, ratio_milli: int, threshold: float) -> str:
        amount = f"r={r}" if ratio_milli < 0 else f"{ratio_milli / 10:.1f}% per block" + (
            f" of the tokens beyond {r}" if r else "")
        if self.config.mode == "threshold":
            return f"threshold {threshold:.3f} (≤ {amount})"
        return f"{self.config.mode} {amount}"

    def _insert_merge(self, gm, site: Node, mid: Node, size, source, r, ratio_milli, threshold):
        graph = gm.graph
        args = bound_args(site)
        users_before = set(mid.users)
        cursor = mid
        created = []

        def emit(target, call_args):
            """Append a node right after the previous one, so the inserted nodes keep their order."""
            nonlocal cursor
            with graph.inserting_after(cursor):
                cursor = graph.call_function(target, call_args)
            created.append(cursor)
            return cursor

        if size is None:  # no block input to start the state from: it starts here
            state = emit(MERGE_INIT, (mid, args["mask"]))
            size, source = emit(operator.getitem, (state, 0)), emit(operator.getitem, (state, 1))
        importance = None
        if self.config.mode == "prune":
            importance = emit(CLS_IMPORTANCE, (args["q"], args["k"], args["mask"], args["scale"],
                                                self.config.protect[0] if self.config.protect else 0))
        metric = args["k"] if self.config.metric == "keys" else mid
        merged = emit(MERGE_TOKENS, (mid, metric, size, source, importance, r, ratio_milli,
                                     list(self.config.protect), self.config.mode, float(threshold),
                                     self._r_min_milli, self.config.fuse_pruned))
        x_new = emit(operator.getitem, (merged, 0))
        size, source = emit(operator.getitem, (merged, 1)), emit(operator.getitem, (merged, 2))
        bias = emit(MERGE_BIAS, (size, mid, self.config.proportional_attention))
        for user in users_before:
            user.replace_input_with(mid, x_new)
        for node in created:
            node.meta["nn_module_stack"] = mid.meta.get("nn_module_stack", {})
        return x_new, size, source, bias

    @staticmethod
    def _insert_init(gm: torch.fx.GraphModule, analysis: GraphAnalysis) -> tuple[Node | None, Node | None]:
        """(size, source) of the unmerged sequence, read off the first block's input before its attention:
        a head that reads the stream before any merge (an exit gate) then unmerges through the identity.
        (None, None) when no block input is known: the first merge starts the state itself."""
        block = next((b for b in analysis.blocks if b.input is not None and b.sites), None)
        if block is None:
            return None, None
        site = analysis.sites[block.sites[0]].node
        with gm.graph.inserting_before(site):
            state = gm.graph.call_function(MERGE_INIT, (block.input, bound_args(site)["mask"]))
            size = gm.graph.call_function(operator.getitem, (state, 0))
            source = gm.graph.call_function(operator.getitem, (state, 1))
        for node in (state, size, source):
            node.meta["nn_module_stack"] = dict(site.meta.get("nn_module_stack", {}))
        return size, source

    @staticmethod
    def _repoint_lengths(gm: torch.fx.GraphModule, length: int | torch.SymInt, merged: list[Node]) -> None:
        """Shape arguments computed from the *input's* length (``view(x, [B, L, H, D])``) must read the
        merged length after a merge: each is replaced by ``sym_size(merged_hidden, 1)``
        (``repoint_token_count``: a dynamic length by its symbol, a static one in view shapes)."""
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        starts = [(order[hidden], hidden) for hidden in merged]
        sizes: dict[Node, Node] = {}

        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target is UNMERGE:
                continue
            latest = [hidden for position, hidden in starts if position < order.get(node, -1)]
            if not latest:
                continue
            hidden = latest[-1]
            if hidden not in sizes:
                with gm.graph.inserting_after(hidden):
                    sizes[hidden] = gm.graph.call_function(torch.ops.aten.sym_size.int, (hidden, 1))
            repoint_token_count(node, length, sizes[hidden])

    @staticmethod
    def _insert_unmerge(gm: torch.fx.GraphModule, last_output: Node, source: Node) -> None:
        users = list(last_output.users)
        with gm.graph.inserting_after(last_output):
            full = gm.graph.call_function(UNMERGE, (last_output, source))
        for user in users:
            user.replace_input_with(last_output, full)

    @staticmethod
    def _attention_flops_saved(analysis: GraphAnalysis) -> float:
        """Attention FLOPs at the example shape before (recorded at analysis) minus after the rewrite."""
        saved = 0.0
        for site in analysis.sites:
            q, k = fake(site.q), fake(site.k)
            batch, q_len, kv_len = site.example_shape
            saved += site.flops(batch, q_len, kv_len) - site.flops(hint(q.shape[0]), hint(q.shape[-2]),
                                                                   hint(k.shape[-2]))
        return saved

