"""Running exported files in ONNX Runtime with the model's own argument names."""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from dynasparse.errors import DynasparseError


class OrtModel:
    """An ``onnxruntime.InferenceSession`` called with torch tensors (by name or position)."""

    def __init__(self, session: ort.InferenceSession):
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]

    def __call__(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> list[torch.Tensor]:
        feeds = dict(zip(self.input_names, args))
        feeds.update({k: v for k, v in kwargs.items() if k in self.input_names})
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise DynasparseError(f"ONNX model needs inputs {self.input_names}; missing {missing}")
        arrays = {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
                  for k, v in feeds.items()}
        return [torch.from_numpy(out) for out in self.session.run(None, arrays)]


def ort_session(path: str | os.PathLike, providers: list[str] | None = None,
                threads: int | None = None) -> OrtModel:
    """Open an exported file; CPU provider unless ``providers`` says otherwise."""
    if not os.path.exists(path):
        raise DynasparseError(f"no ONNX file at {path}; export one with dynasparse.export_onnx first")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
    return OrtModel(session)


def flat_outputs(output: Any) -> list[torch.Tensor]:
    """A model output (tensor, tuple, ModelOutput) flattened in the order ONNX export writes it."""
    from torch.utils import _pytree as pytree

    return [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]
