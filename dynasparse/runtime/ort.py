"""Running exported files in ONNX Runtime with the model's own argument names."""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from dynasparse.errors import DynasparseError
from dynasparse.registry import first


class OrtModel:
    """An ``onnxruntime.InferenceSession`` called with torch tensors (by name or position)."""

    def __init__(self, session: ort.InferenceSession):
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]

    def feeds(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """Arguments by input name (positional first, then keywords); a missing input is an error."""
        feeds = dict(zip(self.input_names, args))
        feeds.update({k: v for k, v in kwargs.items() if k in self.input_names})
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise DynasparseError(f"ONNX model needs inputs {self.input_names}; missing {missing}")
        return feeds

    def __call__(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> list[torch.Tensor]:
        arrays = {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
                  for k, v in self.feeds(args, kwargs).items()}
        return [torch.from_numpy(out) for out in self.session.run(None, arrays)]


def open_session(path: str | os.PathLike, providers: list[str] | None, threads: int | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])


def ort_session(path: str | os.PathLike, providers: list[str] | None = None, threads: int | None = None) -> Any:
    """Open an exported file; CPU provider unless ``providers`` says otherwise. A file whose metadata a
    technique wrote opens as that technique's runner (a model exported with staged exit gates, for one,
    runs all its stage files with the staged runtime)."""
    if not os.path.exists(path):
        raise DynasparseError(f"no ONNX file at {path}; export one with dynasparse.export_onnx first")
    session = OrtModel(open_session(path, providers, threads))
    return first("ort_model", session, str(path), providers, threads) or session


def flat_outputs(output: Any) -> list[torch.Tensor]:
    """A model output (tensor, tuple, ModelOutput) flattened in the order ONNX export writes it."""
    from torch.utils import _pytree as pytree

    return [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]


