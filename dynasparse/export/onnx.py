"""``dynasparse.export_onnx``: an optimized (or plain) model to an ONNX file that ONNX Runtime runs.

A plain model is optimized with no configs first, so every attention is the canonical op; the dynasparse
ops are translated to standard ONNX ops (``dynasparse.export.translations``). Dynamic dims found at
capture stay dynamic in the ONNX file.
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.export import Dim

from dynasparse.api import OptimizedModel, optimize
from dynasparse.errors import DynasparseError
from dynasparse.export.translations import TRANSLATIONS
from dynasparse.kernels.kv_cache import STATE_FIELDS, empty_state
from dynasparse.ir.capture import batch_of_two
from dynasparse.ir.nodes import quiet_pytree_notice
from dynasparse.passes.exit_gate import EXIT_META
from dynasparse.passes.kv_eviction import CACHE_META, step_graph
from dynasparse.passes.token_merge import MERGE_GATE

KV_METADATA = "dynasparse.kv_cache"
EXIT_METADATA = "dynasparse.exit"


def _writable(path: str | os.PathLike) -> Path:
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise DynasparseError(f"export path {path} is a directory; give a file path such as {path / 'model.onnx'}")
    if not parent.exists():
        raise DynasparseError(f"cannot write {path}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise DynasparseError(f"cannot write {path}: folder {parent} is not writable; choose another path")
    return path


def export_onnx(model: torch.nn.Module, path: str | os.PathLike, *, example_inputs: tuple | torch.Tensor = (),
                example_kwargs: dict[str, Any] | None = None, opset_version: int = 18) -> Path:
    """Export ``model`` (an ``OptimizedModel`` or any module ``optimize`` accepts) to ``path``.

    Example inputs default to those the optimized model was captured with.
    """
    path = _writable(path)
    if not isinstance(model, OptimizedModel):
        model = optimize(model, [], example_inputs=example_inputs, example_kwargs=example_kwargs)
    if example_inputs == () and example_kwargs is None:
        args, kwargs = model.example_args, model.example_kwargs
    else:
        args = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        args, kwargs = model.layout.arrange(tuple(args), dict(example_kwargs or {}))
    if EXIT_META in model.graph_module.meta:
        return _export_gated(model, path, args, kwargs, opset_version)
    if MERGE_GATE in model.graph_module.meta:
        warnings.warn("TokenMergeConfig.dense_below chooses a graph per call in PyTorch only: the ONNX file holds "
                      "the merged graph and merges at every batch size", stacklevel=2)
    if CACHE_META in model.graph_module.meta:
        program = _export_decoder_step(model, args, kwargs, opset_version)
    else:
        program = _onnx_program(model.graph_module, tuple(args), kwargs, model.dynamic_shapes, opset_version)
    program.save(str(path))
    return path


def _onnx_program(module: torch.nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any, opset_version: int,
                  optimize: bool = True, **names):
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration_log.level
    registration_log.setLevel(logging.ERROR)  # it warns about every torchvision op it cannot register
    try:
        with torch.no_grad(), quiet_pytree_notice():
            return torch.onnx.export(module, args, kwargs=kwargs, dynamo=True, dynamic_shapes=dynamic_shapes,
                                     opset_version=opset_version, custom_translation_table=TRANSLATIONS,
                                     verbose=False, optimize=optimize, **names)
    finally:
        registration_log.setLevel(level)


def _export_decoder_step(model: OptimizedModel, args: tuple, kwargs: dict, opset_version: int):
    """A KV-cache decoder exports as one step: (inputs, cache) → (outputs, updated cache).

    Batch, new tokens and cache slots stay dynamic; the config and the cache layout go into the file's
    metadata, so ``dynasparse.generate`` can drive the ONNX Runtime session with its own cache.
    """
    plan = model.graph_module.meta[CACHE_META]
    step, input_names, output_names = step_graph(model.graph_module, plan, functional=True)
    inputs = list(args) + [kwargs[name] for name in model.layout.captured[len(args):]]
    batch = inputs[0].shape[0]
    states = [empty_state(batch, s.num_kv_heads, 8, s.head_dim, s.value_dim, s.dtype) for s in plan.sites]
    cache = [state[field] for state in states for field in STATE_FIELDS]
    auto = Dim.AUTO
    dynamic = [{0: auto, 1: auto} if t.dim() >= 2 else {0: auto} for t in inputs]
    for state in states:
        dynamic += [{0: auto, 2: auto}, {0: auto, 2: auto}, {0: auto, 2: auto}, {0: auto, 2: auto}, {0: auto}]
    # no onnxscript optimizer pass: its rewriter takes minutes on a 30-layer decoder step (a graph per
    # layer for the cache), and ONNX Runtime optimizes the graph itself when it loads it
    program = _onnx_program(step, tuple(inputs + cache), {}, tuple(dynamic), opset_version, optimize=False,
                            input_names=input_names, output_names=output_names)
    program.model.metadata_props[KV_METADATA] = json.dumps({
        "config": plan.config.to_dict(),
        "sites": [{"policy": s.policy, "num_kv_heads": s.num_kv_heads, "head_dim": s.head_dim,
                   "value_dim": s.value_dim, "dtype": str(s.dtype).removeprefix("torch.")} for s in plan.sites]})
    return program


def _auto_dims(tensors: list[torch.Tensor]) -> tuple:
    return tuple({i: Dim.AUTO for i in range(t.dim())} for t in tensors)


def _export_gated(model: OptimizedModel, path: Path, args: tuple, kwargs: dict, opset_version: int) -> Path:
    """A model with exit gates exports as its stages.

    ``mode="staged"``: ``path`` holds stage 0, ``<stem>.stage<k>.onnx`` the others, and the metadata of
    ``path`` the exit logic, so ``ort_session(path)`` runs them with the staged runtime (rows leave at each
    gate). ``mode="whole_batch"``: one file whose gates are ONNX ``If`` nodes, runnable by any ONNX Runtime.
    """
    from torch.fx._pytree import tree_flatten_spec

    from dynasparse.runtime.staged import WholeBatchExit

    runner, plan = model.runner, model.runner.plan
    args, kwargs, _ = batch_of_two(tuple(args), dict(kwargs))  # a batch of one would fix the batch dim
    flat = list(tree_flatten_spec((args, kwargs), model.graph_module._in_spec))
    split = runner.split
    if plan.config.mode == "whole_batch":
        program = _onnx_program(WholeBatchExit(split, plan), tuple(flat), {}, (_auto_dims(flat),), opset_version,
                                input_names=split.input_names[0])
        program.save(str(path))
        return path
    files, live = [], flat
    for k, stage in enumerate(split.modules):
        target = path if k == 0 else path.with_name(f"{path.stem}.stage{k}{path.suffix}")
        program = _onnx_program(stage, tuple(live), {}, _auto_dims(live), opset_version,
                                input_names=split.input_names[k], output_names=split.output_names[k])
        if k == 0:
            first = program
        else:
            program.save(str(target))
        files.append(target.name)
        with torch.no_grad():
            live = list(stage(*live))[:len(split.row_wise[k])] if k < len(split.row_wise) else []
    first.model.metadata_props[EXIT_METADATA] = json.dumps({
        "stages": files, "row_wise": split.row_wise, "thresholds": plan.thresholds,
        "config": plan.config.to_dict(), "num_blocks": plan.num_blocks,
        "gate_blocks": [g.block for g in plan.gates]})
    first.save(str(path))
    return path
