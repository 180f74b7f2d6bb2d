"""One ONNX export of a graph module: dynasparse ops lowered to standard ONNX, named inputs, dynamic dims.

Ops whose torch reference has static shapes are exported by tracing that reference in their place (each
technique's ``onnx_lowered`` ops: their graph nodes call the reference while ``torch.export`` traces, which
costs no second pass over the graph; ops called from Python are decomposed after), so they are spelled
once, in torch; only ops the torch path cannot export (data-dependent gathers) have hand-written
onnxscript translations (``onnx_translations``).
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch.export import Dim

from dynasparse.errors import DynasparseError
from dynasparse.export.translations import ATTENTION_TRANSLATIONS
from dynasparse.ir.nodes import quiet_pytree_notice
from dynasparse.ir.ops import implementation
from dynasparse.registry import all_techniques


def writable(path: str | os.PathLike) -> Path:
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise DynasparseError(f"export path {path} is a directory; give a file path such as {path / 'model.onnx'}")
    if not parent.exists():
        raise DynasparseError(f"cannot write {path}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise DynasparseError(f"cannot write {path}: folder {parent} is not writable; choose another path")
    return path


def auto_dims(tensors: list[torch.Tensor]) -> tuple:
    return tuple({i: Dim.AUTO for i in range(t.dim())} for t in tensors)


@contextlib.contextmanager
def lowered(module: torch.nn.Module, lowerings: dict):
    """While open, the nodes of ``module``'s graph modules that call an op of ``lowerings`` call its torch
    reference instead, so tracing the module traces the reference. The graphs are restored on exit."""
    changed = []
    for graph_module in {m for m in module.modules() if isinstance(m, torch.fx.GraphModule)}:
        nodes = [n for n in graph_module.graph.nodes if n.op == "call_function" and n.target in lowerings]
        for node in nodes:
            changed.append((node, node.target))
            node.target = lowerings[node.target]
        if nodes:
            graph_module.recompile()
    try:
        yield
    finally:
        for node, target in changed:
            node.target = target
        for graph_module in {node.graph.owning_module for node, _ in changed}:
            graph_module.recompile()


def onnx_program(module: torch.nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any, opset_version: int,
                 optimize: bool = True, **names):
    """``torch.onnx.export`` (dynamo) of ``module`` with every technique's lowerings and translations."""
    translations, lowerings = dict(ATTENTION_TRANSLATIONS), {}
    for technique in all_techniques():
        translations.update(technique.onnx_translations)
        lowerings.update({op: implementation(op) for op in technique.onnx_lowered})
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration_log.level
    registration_log.setLevel(logging.ERROR)  # it warns about every torchvision op it cannot register
    try:
        # captured the way torch.onnx.export captures (size-oblivious 0/1 dims, runtime asserts over guards)
        with torch.no_grad(), quiet_pytree_notice(), torch.fx.experimental._config.patch(backed_size_oblivious=True):
            with lowered(module, lowerings):
                program = torch.export.export(module, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False,
                                              prefer_deferred_runtime_asserts_over_guards=True)
            if any(n.target in lowerings for n in program.graph.nodes):  # called from Python, not a graph node
                program = program.run_decompositions(lowerings)
            drop_dynamic_squeezes(program)
            return torch.onnx.export(program, dynamo=True, opset_version=opset_version,
                                     custom_translation_table=translations, verbose=False, optimize=optimize,
                                     **names)
    finally:
        registration_log.setLevel(level)


SQUEEZES = (torch.ops.aten.squeeze.dim, torch.ops.aten.squeeze.dims)


def drop_dynamic_squeezes(program: torch.export.ExportedProgram) -> None:
    """Squeezes of dynamic dims leave the graph, in place. A model's ``x.squeeze(1)`` on a token dim is a
    no-op in torch whenever that dim is not 1, but ONNX's Squeeze fails on a dim that is not 1 (PixArt's output
    projection). Exported dynamic dims are assumed not to be 1, as the capture's size-oblivious guards assume."""
    graph = program.graph_module.graph
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target in SQUEEZES]:
        source, dims = node.args[0], node.args[1]
        rank = source.meta["val"].dim()
        dims = [dims] if isinstance(dims, int) else list(dims)
        static = [d for d in dims if not isinstance(source.meta["val"].shape[d % rank], torch.SymInt)]
        if len(static) == len(dims):
            continue
        if static:
            node.target, node.args = torch.ops.aten.squeeze.dims, (source, static)
        else:
            node.replace_all_uses_with(source)
            graph.erase_node(node)
    program.graph_module.recompile()
