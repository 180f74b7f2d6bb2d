"""``torch.compile(model, backend="dynasparse", options={"configs": [...]})``.

Dynamo hands over a torch-level graph. It is re-traced to the pre-dispatch aten IR that torch.export
produces (there ``scaled_dot_product_attention`` is still one node), so the very same pipeline runs on it;
the rewritten graph then goes to Inductor, which compiles everything else and calls our ops as opaque
kernels. Options: ``configs`` (list of configs), ``inductor`` (default True; False runs the rewritten
graph eagerly, handy for debugging), ``on_report`` (called with each compiled graph's
``OptimizationReport``, since Dynamo may split a model into several graphs).
A technique whose runtime runs outside one graph says so here (``Technique.compile_graph``), or picks the
graph for the shapes Dynamo compiles for.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch._guards import detect_fake_mode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx import Interpreter
from torch.fx.traceback import preserve_node_meta

from dynasparse.errors import DynasparseError
from dynasparse.passes.pipeline import build_passes, run_pipeline
from dynasparse.passes.report import OptimizationReport
from dynasparse.registry import all_techniques


def _aten_graph(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> torch.fx.GraphModule:
    """Pre-dispatch aten graph of Dynamo's graph, its inputs named as Dynamo names them (``L_timestep_``:
    a pass that reads an input by name finds it)."""
    traced = _trace(gm, example_inputs)
    for ours, theirs in zip((n for n in traced.graph.nodes if n.op == "placeholder"),
                            (n for n in gm.graph.nodes if n.op == "placeholder")):
        ours._rename(theirs.name)
    traced.recompile()
    return traced


def _trace(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> torch.fx.GraphModule:
    """Pre-dispatch aten graph of Dynamo's graph, traced under Dynamo's own fake mode."""
    fake_mode = detect_fake_mode(example_inputs)
    # run node by node (Interpreter) under preserve_node_meta: each aten node keeps its Dynamo node's
    # module stack, which block analysis reads
    if fake_mode is None:
        with torch.no_grad(), preserve_node_meta():
            return make_fx(Interpreter(gm).run, pre_dispatch=True, tracing_mode="fake")(*example_inputs)
    allow = fake_mode.allow_non_fake_inputs
    fake_mode.allow_non_fake_inputs = True  # the graph's own buffers (e.g. position ids) are real tensors
    try:
        with fake_mode, torch.no_grad(), preserve_node_meta():
            return make_fx(Interpreter(gm).run, pre_dispatch=True)(*example_inputs)
    finally:
        fake_mode.allow_non_fake_inputs = allow


def dynasparse_backend(gm: torch.fx.GraphModule, example_inputs: list[Any], mode: str | None = None,
                       options: dict[str, Any] | None = None) -> Callable:
    options = dict(options or {})
    passes = build_passes(options.pop("configs", []))
    use_inductor = options.pop("inductor", True)
    on_report = options.pop("on_report", None)
    if options:
        raise DynasparseError(f"unknown dynasparse backend options {sorted(options)}; "
                              "known: configs, inductor, on_report")
    result = run_pipeline(_aten_graph(gm, example_inputs), passes)
    graph_module = result.graph_module
    for technique in all_techniques():  # each may refuse, or pick the graph to compile
        graph_module = technique.compile_graph(graph_module, example_inputs, result.results[-1].notes)
    if on_report is not None:
        on_report(OptimizationReport("dynamo graph", result.analysis, result.results))
    if not use_inductor:
        return graph_module
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(graph_module, example_inputs)
