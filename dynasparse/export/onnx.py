"""``dynasparse.export_onnx``: an optimized (or plain) model to an ONNX file that ONNX Runtime runs.

A plain model is optimized with no configs first, so every attention is the canonical op; the dynasparse
ops are translated to standard ONNX ops (``dynasparse.export.translations``). Dynamic dims found at
capture stay dynamic in the ONNX file.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from dynasparse.api import OptimizedModel, optimize
from dynasparse.errors import DynasparseError
from dynasparse.export.translations import TRANSLATIONS


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
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration_log.level
    registration_log.setLevel(logging.ERROR)  # it warns about every torchvision op it cannot register
    try:
        with torch.no_grad():
            program = torch.onnx.export(model.graph_module, tuple(args), kwargs=kwargs, dynamo=True,
                                        dynamic_shapes=model.dynamic_shapes, opset_version=opset_version,
                                        custom_translation_table=TRANSLATIONS, verbose=False)
    finally:
        registration_log.setLevel(level)
    program.save(str(path))
    return path
