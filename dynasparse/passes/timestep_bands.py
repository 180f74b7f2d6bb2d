"""One graph for a whole sampling loop: token density by denoising timestep, picked inside the graph.

Token merging with ``TokenMergeConfig.timestep_schedule`` leaves one rewritten graph and, per band of
timesteps, how much each merge keeps (``TimestepBands``). Once every pass has run, each band's graph is a
copy of it that differs only in those amounts, and the finished graph chooses with ``torch.cond`` on the
timestep input, highest band first:

    t = max(timestep)                 a batch of mixed timesteps runs the band of its noisiest row
    out = cond(t >= T0, band_0, cond(t >= T1, band_1, ... band_last))

Every band unmerges to the full token grid, so the branches return the same shapes. torch.cond runs the
chosen branch in eager, compiles under Inductor, and exports to ONNX ``If``.
"""
from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node
from torch.fx.graph import CodeGen

from dynasparse.errors import DynasparseError
from dynasparse.ir.nodes import copy_graph, fake
from dynasparse.passes.token_merge import set_merge_amounts
from dynasparse.plans import TIMESTEP_BANDS, TimestepBands


def _flat_outputs(gm: GraphModule) -> list[Node]:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    flat = output.args[0] if isinstance(output.args[0], (tuple, list)) else [output.args[0]]
    if not all(isinstance(n, Node) and isinstance(fake(n), torch.Tensor) for n in flat):
        raise DynasparseError("TokenMergeConfig.timestep_schedule picks a graph per band with torch.cond, whose "
                              "branches return tensors only; this model also returns other values")
    return list(flat)


def _tensor_attributes(gm: GraphModule) -> list[str]:
    """The parameters, buffers and constants the graph reads (``get_attr``), in graph order."""
    targets = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    return list(dict.fromkeys(t for t in targets if isinstance(operator.attrgetter(t)(gm), torch.Tensor)))


def _band_module(gm: GraphModule, amounts: dict[str, int], lifted: list[str]) -> GraphModule:
    """The rewritten graph with one band's merge amounts, as a function of the flat inputs followed by the
    ``lifted`` tensors (torch.cond's branches read no attributes: the finished graph owns each weight once),
    returning a tuple."""
    graph = copy_graph(gm.graph)
    set_merge_amounts(graph, amounts)
    cursor = [n for n in graph.nodes if n.op == "placeholder"][-1]
    inputs = {}
    for target in lifted:
        with graph.inserting_after(cursor):
            cursor = inputs[target] = graph.placeholder(target.replace(".", "_"))
    for node in list(graph.nodes):
        if node.op == "get_attr" and node.target in inputs:
            node.replace_all_uses_with(inputs[node.target])
            graph.erase_node(node)
        elif node.op == "output":
            flat = node.args[0] if isinstance(node.args[0], (tuple, list)) else [node.args[0]]
            node.args = (tuple(flat),)
    graph._codegen = CodeGen()
    return GraphModule(gm, graph)


def _chooser(gm: GraphModule, bands: list[tuple[float, float, dict[str, int]]], timestep_at: int,
             lifted: list[str], top: bool) -> GraphModule:
    """cond(max(t) >= the first band's lowest timestep, the first band, the chooser of the others); bands
    ordered from the highest timestep down. The top chooser reads the weights and is called like ``gm``."""
    if len(bands) == 1:
        return _band_module(gm, bands[0][2], lifted)
    graph = torch.fx.Graph()
    operands = []
    for node in (n for n in gm.graph.nodes if n.op == "placeholder"):
        operands.append(graph.placeholder(node.name))
        operands[-1].meta = dict(node.meta)
    timestep = operands[timestep_at]
    operands += [graph.get_attr(t) if top else graph.placeholder(t.replace(".", "_")) for t in lifted]
    owner = {t: operator.attrgetter(t)(gm) for t in lifted} if top else {}
    owner.update(high=_band_module(gm, bands[0][2], lifted), low=_chooser(gm, bands[1:], timestep_at, lifted, False))
    highest = graph.call_function(torch.ops.aten.max.default, (timestep,))
    pred = graph.call_function(torch.ops.aten.ge.Scalar, (highest, bands[0][0]))
    chosen = graph.call_function(torch.ops.higher_order.cond,
                                 (pred, graph.get_attr("high"), graph.get_attr("low"), tuple(operands)))
    flat = [graph.call_function(operator.getitem, (chosen, i)) for i in range(len(_flat_outputs(gm)))]
    if top:
        output = next(n for n in gm.graph.nodes if n.op == "output")
        graph.output(tuple(flat) if isinstance(output.args[0], (tuple, list)) else flat[0])
        graph._codegen = gm.graph._codegen
    else:
        graph.output(tuple(flat))
    return GraphModule(owner, graph)


def finish_graph(gm: GraphModule) -> GraphModule:
    """The graph that picks each call's band from the timestep (the graph itself when no schedule is set)."""
    bands: TimestepBands | None = gm.meta.get(TIMESTEP_BANDS)
    if bands is None or len(bands.bands) == 1:  # one band: the graph was rewritten for it
        return gm
    _flat_outputs(gm)
    ordered = sorted(bands.bands, key=lambda band: -band[0])
    finished = _chooser(gm, ordered, bands.timestep_at, _tensor_attributes(gm), top=True)
    finished.meta.update(gm.meta)
    for spec in ("_in_spec", "_out_spec"):
        if hasattr(gm, spec):
            setattr(finished, spec, getattr(gm, spec))
    finished.recompile()
    return finished
