"""``dynasparse.export_onnx``: an optimized (or plain) model to an ONNX file that ONNX Runtime runs.

A plain model is optimized with no configs first, so every attention is the canonical op; the dynasparse
ops are lowered to standard ONNX ops (``dynasparse.export.program``). A technique that changes what the
export is (exit gates write their stages, a KV-cache decoder its decode step) writes it through its record
(``dynasparse.techniques``). Dynamic dims found at capture stay dynamic in the ONNX file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from dynasparse.api import OptimizedModel, optimize
from dynasparse.export.program import onnx_program, writable
from dynasparse.registry import all_techniques


def export_onnx(model: torch.nn.Module, path: str | os.PathLike, *, example_inputs: tuple | torch.Tensor = (),
                example_kwargs: dict[str, Any] | None = None, opset_version: int = 18) -> Path:
    """Export ``model`` (an ``OptimizedModel`` or any module ``optimize`` accepts) to ``path``.

    Example inputs default to those the optimized model was captured with.
    """
    path = writable(path)
    if not isinstance(model, OptimizedModel):
        model = optimize(model, [], example_inputs=example_inputs, example_kwargs=example_kwargs)
    if example_inputs == () and example_kwargs is None:
        args, kwargs = model.example_args, model.example_kwargs
    else:
        args = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        args, kwargs = model.layout.arrange(tuple(args), dict(example_kwargs or {}))
    for technique in all_techniques():
        written = technique.export_onnx(model, path, tuple(args), kwargs, opset_version)
        if written is not None:
            return written
    program = onnx_program(model.graph_module, tuple(args), kwargs, model.dynamic_shapes, opset_version)
    program.save(str(path))
    return path
