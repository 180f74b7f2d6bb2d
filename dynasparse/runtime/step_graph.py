"""The decoder graph as a plain step function whose cache is passed in: what ``torch.compile`` and the ONNX
export both run, while the eager runtime binds the cache as the graph's buffers instead (``KVCache.bind``).
"""
from __future__ import annotations

import operator

import torch

from dynasparse.ir.nodes import copy_graph
from dynasparse.ir.ops import KV_CACHE_ATTENTION, KV_CACHE_ATTENTION_FUNCTIONAL, KV_CACHE_SPARSE_ATTENTION
from dynasparse.plans import CachePlan


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
            for field in reversed(site.fields):
                node = graph.placeholder(f"kv{i}_{field}")
                node.meta["val"] = getattr(gm, site.buffer(field))
                inputs[site.buffer(field)] = node
    for node in list(graph.nodes):
        if node.op == "get_attr" and node.target in inputs:
            node.replace_all_uses_with(inputs[node.target])
            graph.erase_node(node)
    new_state: list[torch.fx.Node] = []
    for node in list(graph.nodes):
        if functional and node.op == "call_function" and node.target in (KV_CACHE_ATTENTION, KV_CACHE_SPARSE_ATTENTION):
            with graph.inserting_after(node):  # a sparse site's step exports dense (its prefill reads every block)
                functional_node = graph.call_function(KV_CACHE_ATTENTION_FUNCTIONAL, node.args[:16])
            with graph.inserting_after(functional_node):
                parts = [graph.call_function(operator.getitem, (functional_node, j)) for j in range(6)]
            node.replace_all_uses_with(parts[0])
            graph.erase_node(node)
            new_state.extend(parts[1:])
    output = next(n for n in graph.nodes if n.op == "output")
    flat = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
    output.args = (tuple(flat) + tuple(new_state),) if functional else (flat[0],)
    for site in plan.sites:
        for field in site.fields:
            delattr(gm, site.buffer(field))
    graph.eliminate_dead_code()
    gm.recompile()
    input_names = [n.name for n in placeholders] + [f"kv{i}_{f}" for i, s in enumerate(plan.sites) for f in s.fields]
    output_names = [f"output_{j}" for j in range(len(flat))] + [
        f"kv{i}_{f}_out" for i, s in enumerate(plan.sites) for f in s.fields]
    return gm, input_names, output_names
