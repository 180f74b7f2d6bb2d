"""dKV-Cache: a masked-diffusion LM's blocks run on the active tokens only, over cached keys and values.

    embeddings [B, L] → gather_active(index) [B, A] → blocks, each attention = cached_attention → head [B, A]

A diffusion LM (LLaDA, MDLM) re-reads the whole sequence at each denoising step, bidirectionally. dKV-Cache
(Ma et al., 2025) keeps every layer's keys and values across steps and recomputes only the tokens that are
still masked plus those decoded one step ago (delayed caching), refreshing every token every few steps. The
pass makes the graph take the active positions and the caches as buffers; ``dynasparse.unmask`` decides the
active set per step and binds them. Called plainly, the graph has every token active: the model's output.
"""
from __future__ import annotations

import dataclasses

import networkx as nx
import torch
from torch.fx import Node

from dynasparse.config import BaseConfig, config_type
from dynasparse.errors import DynasparseError
from dynasparse.ir.analysis import AttentionSite, GraphAnalysis, to_networkx
from dynasparse.ir.nodes import (bound_args, copy_meta, fake, hint, input_size, is_size, module_paths,
                                 repoint_token_count)
from dynasparse.ir.ops import CACHED_ATTENTION, GATHER_ACTIVE, SCATTER_ACTIVE
from dynasparse.plans import DELAYED_KV_META, DelayedKVPlan
from dynasparse.registry import PassResult


@config_type
@dataclasses.dataclass
class DelayedKVConfig(BaseConfig):
    """dKV-Cache for a masked-diffusion (bidirectional) LM, run by ``dynasparse.unmask``.

    ``refresh_every``: every that many denoising steps, every token is recomputed and the caches refreshed
    (1: every step, which is the model itself). ``delay``: steps a decoded token stays active before its
    keys and values are taken from the cache (dKV-Cache's delayed caching: 1; 0 caches them at once).
    The defaults suit LLaDA's semi-autoregressive blocks of 32 steps: each block starts from a refresh, and
    its decoded tokens stay fresh until it ends (as Fast-dLLM refreshes per block). On the difflm trained
    here they kept 99.8-100% of the bytes equal to recomputing everything, where dKV-Cache's own setting
    (refresh every 8 steps, delay 1) kept 91-92% (``benchmarks/diffusion_lm.py``).
    """

    refresh_every: int = 32
    delay: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_int("refresh_every", 1)
        self.check_int("delay", 0)
        if self.layers is not None:
            raise DynasparseError("DelayedKVConfig runs every block on the active tokens, so layers= cannot "
                                  "restrict it; leave layers out")


INDEX = "dkv_index"
STREAM = "dkv_stream"  # the whole stream after the last block, for a head that reads every token


def _buffer(gm: torch.fx.GraphModule, name: str, value: torch.Tensor, before: Node) -> Node:
    gm.register_buffer(name, value, persistent=False)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta["val"] = value
    return node


class DelayedKVPass:
    name = "delayed_kv"
    whole_stream_out = False  # the head reads the active tokens only (a diffusion LM's logits)

    def __init__(self, config: DelayedKVConfig):
        self.config = config

    # -- find sites -------------------------------------------------------------------------------------------
    def _check(self, analysis: GraphAnalysis) -> tuple[Node, list[AttentionSite]]:
        """The stream entering block 0 and the self-attention sites to cache, after checking that every site
        is bidirectional and reads the stream's own tokens as queries. A cross-attention (a DiT's text, as
        PixArt's) is left as it is: its keys come from another sequence, which its active queries read whole."""
        name = type(self.config).__name__
        if not analysis.blocks or analysis.blocks[0].input is None:
            raise DynasparseError(f"{name} needs a stack of transformer blocks whose input it can find; this graph "
                                  "has none (attention outside indexed modules)")
        stream = analysis.blocks[0].input
        length = str(fake(stream).shape[1])
        for site in analysis.sites:
            where = site.module or site.node.name
            if site.causal:
                raise DynasparseError(f"{name} caches a bidirectional (diffusion) model, and {where} is causal; "
                                      "for an autoregressive decoder use KVEvictionConfig")
            if site.sparse:
                raise DynasparseError(f"{name} rewrites dense attention sites; leave SparseAttentionConfig out")
            if site.q_len != length:
                raise DynasparseError(f"{where} attends with {site.example_shape[1]} queries where the stream holds "
                                      f"{hint(fake(stream).shape[1])} tokens (a joint attention over concatenated "
                                      f"streams, as in SD3's MMDiT); {name} needs attention over the stream's own "
                                      "tokens")
            mask = fake(bound_args(site.node)["mask"])
            if site.kv_len != site.q_len and mask is not None and mask.dim() >= 2 and mask.shape[-2] != 1:
                raise DynasparseError(f"{where} is a cross-attention with a mask per query; {name} leaves "
                                      "cross-attention to run on the active queries and needs its mask broadcast "
                                      "over them")
        return stream, [site for site in analysis.sites if site.kv_len == site.q_len]

    # -- rewrite ----------------------------------------------------------------------------------------------
    @staticmethod
    def _per_token_inputs(gm: torch.fx.GraphModule, analysis: GraphAnalysis, stream: Node,
                          length: int | torch.SymInt) -> tuple[list[Node], set[Node]]:
        """What the blocks read per token from outside them: the stream, and any [B or 1, L, D] tensor such as
        RoPE's cos and sin. (The mask is [B, 1, L, L]: its query rows are cut inside the attention op.)"""
        paths = {block.module for block in analysis.blocks}
        members = {n for n in gm.graph.nodes if paths & set(module_paths(n))}
        outside = dict.fromkeys(a for n in gm.graph.nodes if n in members for a in n.all_input_nodes
                                if a not in members)

        def per_token(node: Node) -> bool:
            value = fake(node)
            return (node is not stream and isinstance(value, torch.Tensor) and value.dim() == 3
                    and (is_size(value.shape[1], length) if isinstance(length, torch.SymInt)
                         else value.shape[1] == length))

        return [stream, *filter(per_token, outside)], members

    def apply(self, gm: torch.fx.GraphModule, analysis: GraphAnalysis) -> PassResult:
        result = PassResult(self.name)
        stream, own = self._check(analysis)
        batch, length = fake(stream).shape[:2]
        found = input_size(gm, length)
        if found is None:
            raise DynasparseError(f"{type(self.config).__name__} reads the sequence length off the inputs, and the "
                                  f"stream's {length} tokens are not a function of their shapes; capture with the "
                                  "sequence length as an input dimension, or a fixed one")
        per_token, members = self._per_token_inputs(gm, analysis, stream, length)
        example_batch, example_length = hint(batch), hint(length)
        index = _buffer(gm, INDEX, torch.arange(example_length).expand(example_batch, -1).contiguous(),
                        next(n for n in gm.graph.nodes if n.op != "placeholder"))
        gathered = []
        for node in per_token:
            with gm.graph.inserting_after(node):
                active = gm.graph.call_function(GATHER_ACTIVE, (node, index))
            copy_meta(node, active)
            for user in [u for u in node.users if u in members]:
                user.replace_input_with(node, active)
            gathered.append(active)
        caches: list[tuple[str, str]] = []
        dims: list[tuple[int, int]] = []
        for site in analysis.sites:
            if site.kv_len != site.q_len:
                result.applied.append(f"{site.module or site.node.name}: a cross-attention, run on the active "
                                      "queries over its whole other sequence")
        for i, site in enumerate(own):
            args = bound_args(site.node)
            k, v = fake(args["k"]), fake(args["v"])
            names = (f"dkv{i}_keys", f"dkv{i}_values")
            buffers = [_buffer(gm, name, torch.zeros(example_batch, site.num_kv_heads, example_length, x.shape[-1],
                                                     dtype=x.dtype), site.node)
                       for name, x in zip(names, (k, v))]
            with gm.graph.inserting_before(site.node):
                cached = gm.graph.call_function(CACHED_ATTENTION, (args["q"], args["k"], args["v"], args["mask"],
                                                                   *buffers, index, args["scale"]))
            copy_meta(site.node, cached)
            site.node.replace_all_uses_with(cached)
            gm.graph.erase_node(site.node)
            caches.append(names)
            dims.append((int(k.shape[-1]), int(v.shape[-1])))
            result.applied.append(f"{site.module or cached.name}: keys and values cached across denoising steps")
            result.num_matches += 1
        stream_cache = self._scatter_stream(gm, analysis, index) if self.whole_stream_out else None
        self._repoint_lengths(gm, gathered, length, stop=stream_cache)
        gm.graph.lint()
        gm.recompile()
        gm.meta[DELAYED_KV_META] = DelayedKVPlan(
            self.config, INDEX, caches, [s.num_kv_heads for s in own], dims, found,
            stream_cache=STREAM if stream_cache is not None else None, stream_dim=int(fake(stream).shape[-1]))
        side = [n.name for n in per_token[1:]]
        result.notes.append(self._describe(side))
        return result

    def _describe(self, side: list[str]) -> str:
        return (f"delayed_kv: blocks run on the active tokens of each denoising step (the stream"
                f"{' and ' + ', '.join(side) if side else ''} gathered); every token is recomputed "
                f"every {self.config.refresh_every} steps, a decoded one {self.config.delay} step(s) after it is "
                "decoded")

    @staticmethod
    def _scatter_stream(gm: torch.fx.GraphModule, analysis: GraphAnalysis, index: Node) -> Node:
        """For a head that reads every token: the last block's output goes through ``scatter_active`` into a
        cache of the whole stream, and everything after the blocks reads that."""
        last = analysis.blocks[-1].output
        if last is None:
            raise DynasparseError("the last transformer block's output was not found, so the head cannot be given "
                                  "the whole stream back; this model's blocks cannot run on active tokens")
        value = fake(last)
        cache = _buffer(gm, STREAM, torch.zeros(hint(value.shape[0]), hint(value.shape[1]), value.shape[-1],
                                                dtype=value.dtype), last)
        users = list(last.users)
        with gm.graph.inserting_after(last):
            whole = gm.graph.call_function(SCATTER_ACTIVE, (last, cache, index))
        copy_meta(last, whole)
        for user in users:
            user.replace_input_with(last, whole)
        return whole

    @staticmethod
    def _repoint_lengths(gm: torch.fx.GraphModule, gathered: list[Node], length: int | torch.SymInt,
                         stop: Node | None) -> None:
        """Shapes computed from the input's length (``view(x, [B, L, H, D])``) inside what reads the active
        tokens must read the active count: each becomes ``sym_size(active stream, 1)`` (``repoint_token_count``).
        The mask is not downstream of them, so it keeps the whole sequence as its keys; nor is what reads the
        whole stream again after ``stop``."""
        flow = to_networkx(gm)
        downstream = set().union(*(nx.descendants(flow, node) for node in gathered))
        if stop is not None:
            downstream -= nx.descendants(flow, stop) | {stop}
        with gm.graph.inserting_after(gathered[0]):
            count = gm.graph.call_function(torch.ops.aten.sym_size.int, (gathered[0], 1))

        for node in downstream:
            if node.op == "call_function":
                repoint_token_count(node, length, count)
