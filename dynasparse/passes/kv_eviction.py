"""KV eviction: every causal attention site of a decoder becomes attention over a bounded cache.

    attention(q, k, v, mask)   ⟶   kv_cache_attention(q, k, v, mask, keys, values, positions, scores, seen)

The model is captured **without** a cache; this pass gives each site a fixed-capacity cache that lives on
the graph module as buffers (``kv_cache_<layer>_<field>``) and that ``dynasparse.runtime`` allocates,
resets and resizes. New keys enter after RoPE (the site sees them post-rotation), one cache row per KV
head. Layers outside ``layers`` get a cache with the ``full`` policy, so every layer still remembers.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from dynasparse.config import KVEvictionConfig
from dynasparse.errors import DynasparseError
from dynasparse.ir.analysis import GraphAnalysis
from dynasparse.ir.nodes import bound_args, copy_graph, copy_meta, fake
from dynasparse.ir.ops import KV_CACHE_ATTENTION, KV_CACHE_ATTENTION_FUNCTIONAL
from dynasparse.kernels.kv_cache import STATE_FIELDS, empty_state
from dynasparse.passes.base import PassResult, register_pass

CACHE_META = "dynasparse_kv_cache"


@dataclass(frozen=True)
class CacheSite:
    """One layer's cache as the runtime needs to allocate it."""

    layer: int
    prefix: str  # buffer names are f"{prefix}_{field}"
    policy: str
    num_kv_heads: int
    head_dim: int
    value_dim: int
    dtype: torch.dtype

    def buffer(self, field: str) -> str:
        return f"{self.prefix}_{field}"


@dataclass(frozen=True)
class CachePlan:
    """What the KV pass left on the graph module: the config and one ``CacheSite`` per attention layer."""

    config: KVEvictionConfig
    sites: tuple[CacheSite, ...]


@register_pass(KVEvictionConfig)
class KVEvictionPass:
    name = "kv_eviction"

    def __init__(self, config: KVEvictionConfig):
        self.config = config

    def apply(self, gm: torch.fx.GraphModule, analysis: GraphAnalysis) -> PassResult:
        c = self.config
        # find sites: every site must be causal (a KV cache means generation)
        acausal = [s for s in analysis.sites if not s.causal]
        if acausal:
            raise DynasparseError(
                f"KV eviction needs a causal decoder, but attention at layer(s) {[s.layer for s in acausal]} is "
                "not causal (an encoder, or a mask the analysis cannot read as causal). Use it on decoder-only "
                "language models (Llama, Qwen2, Mistral, GPT-2, ...).")
        if any(s.sparse for s in analysis.sites):
            raise DynasparseError("KV eviction runs on dense attention sites; apply KVEvictionConfig without "
                                  "SparseAttentionConfig (the bounded cache already bounds decode attention)")
        chosen = [s for s in analysis.sites if c.applies_to(s.layer)]
        if not chosen:
            raise DynasparseError(f"KVEvictionConfig.layers={c.layers} matches no attention layer; the model has "
                                  f"layers {sorted(s.layer for s in analysis.sites)}")
        result = PassResult(self.name)
        sites = []
        for site in analysis.sites:
            # decide: the configured policy on chosen layers, the full cache elsewhere
            policy = c.policy if site in chosen else "full"
            k, v = fake(site.k), fake(site.v)
            cache = CacheSite(site.layer, f"kv_cache_{site.index}", policy, site.num_kv_heads, site.head_dim,
                              int(v.shape[-1]), k.dtype)
            # rewrite: the cache state enters as buffers (sized by the runtime), the op updates it in place
            for field, tensor in empty_state(1, cache.num_kv_heads, 1, cache.head_dim, cache.value_dim,
                                             cache.dtype, k.device).items():
                gm.register_buffer(cache.buffer(field), tensor, persistent=False)
            args = bound_args(site.node)
            with gm.graph.inserting_before(site.node):
                state = [gm.graph.get_attr(cache.buffer(field)) for field in STATE_FIELDS]
                node = gm.graph.call_function(KV_CACHE_ATTENTION, (
                    args["q"], args["k"], args["v"], args["mask"], args["is_causal"], args["scale"], *state,
                    policy, c.sink, c.recent, c.window, c.pool))
            copy_meta(site.node, node)
            site.node.replace_all_uses_with(node)
            gm.graph.erase_node(site.node)
            sites.append(cache)
            result.num_matches += 1
            budget = "every token" if policy == "full" else f"budget {c.budget!r} ({c.schedule})"
            result.applied.append(f"layer {site.layer}: {policy} cache, {budget}, sink {c.sink}, "
                                  f"recent {c.recent}, {site.num_kv_heads} KV heads")
        gm.meta[CACHE_META] = CachePlan(c, tuple(sites))
        return result


def step_graph(graph_module: torch.fx.GraphModule, plan: CachePlan, functional: bool
               ) -> tuple[torch.fx.GraphModule, list[str], list[str]]:
    """A copy of the decoder graph as a plain step function whose cache is passed in, not held.

    Cache buffers become inputs named ``kv<i>_<field>`` after the model's own (flat, positional). With
    ``functional`` each cache node becomes the functional op and the updated state is appended to the
    outputs as ``kv<i>_<field>_out`` (the form that exports); otherwise the nodes update the inputs in place
    and only the model's first output (the logits) is returned (the form ``torch.compile`` gets).
    """
    gm = copy_graph(graph_module)
    gm.graph._codegen = torch.fx.graph.CodeGen()  # plain positional inputs and a flat output tuple
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    inputs: dict[str, torch.fx.Node] = {}
    with graph.inserting_after(placeholders[-1]):
        for i, site in reversed(list(enumerate(plan.sites))):
            for field in reversed(STATE_FIELDS):
                node = graph.placeholder(f"kv{i}_{field}")
                node.meta["val"] = getattr(gm, site.buffer(field))
                inputs[site.buffer(field)] = node
    for node in list(graph.nodes):
        if node.op == "get_attr" and node.target in inputs:
            node.replace_all_uses_with(inputs[node.target])
            graph.erase_node(node)
    new_state: list[torch.fx.Node] = []
    for node in list(graph.nodes):
        if functional and node.op == "call_function" and node.target is KV_CACHE_ATTENTION:
            with graph.inserting_after(node):
                functional_node = graph.call_function(KV_CACHE_ATTENTION_FUNCTIONAL, node.args, node.kwargs)
            with graph.inserting_after(functional_node):
                parts = [graph.call_function(operator.getitem, (functional_node, j)) for j in range(6)]
            node.replace_all_uses_with(parts[0])
            graph.erase_node(node)
            new_state.extend(parts[1:])
    output = next(n for n in graph.nodes if n.op == "output")
    flat = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
    output.args = (tuple(flat) + tuple(new_state),) if functional else (flat[0],)
    for site in plan.sites:
        for field in STATE_FIELDS:
            delattr(gm, site.buffer(field))
    graph.eliminate_dead_code()
    gm.recompile()
    input_names = [n.name for n in placeholders] + [f"kv{i}_{f}" for i in range(len(plan.sites)) for f in STATE_FIELDS]
    output_names = [f"output_{j}" for j in range(len(flat))] + [
        f"kv{i}_{f}_out" for i in range(len(plan.sites)) for f in STATE_FIELDS]
    return gm, input_names, output_names
