"""Does an optimized model, and its ONNX export run in ONNX Runtime, still compute what the original does?"""
from __future__ import annotations

from pathlib import Path

import torch

from dynasparse.api import OptimizedModel
from dynasparse.harness.zoo import ZooModel
from dynasparse.runtime.ort import flat_outputs, ort_session
from dynasparse.table import table


def onnx_parity_table(entry: ZooModel, optimized: OptimizedModel, onnx_path: Path, batch: int, seq_len: int) -> str:
    """The largest difference from the original, of the optimized graph and of ONNX Runtime, at ``batch`` x
    ``seq_len`` and at a batch of one with half the length (so a shape fixed at export would show)."""
    session = ort_session(onnx_path)
    rows = []
    for b, n in [(batch, seq_len), (1, max(seq_len // 2, 4))]:
        inputs = entry.make_inputs(b, n)
        with torch.no_grad():
            reference = flat_outputs(entry.model(**inputs))
            graph = flat_outputs(optimized(**inputs))
        ort_out = session(**inputs)
        rows.append([f"{b}x{n}", f"{max((r - g).abs().max().item() for r, g in zip(reference, graph)):.1e}",
                     f"{max((r - o).abs().max().item() for r, o in zip(reference, ort_out)):.1e}"])
    return table(["batch x seq", "max |torch - optimized|", "max |torch - onnxruntime|"], rows)
