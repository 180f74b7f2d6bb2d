"""Row-sparse matmul on CPU through a small C++ kernel (``row_sparse_cpu.cpp``): ``x @ weight_t`` with the
entries of ``x`` below a threshold left out, reading only the weight rows of channels kept in some row. MLP
width's decode steps are such matmuls; a dense GEMV reads every weight byte whatever the zeros. It builds once
per machine (PyTorch caches it under ``~/.cache/torch_extensions``) and serves fp32 with a few rows:
``usable`` says when; everything else, and every machine without a C++ compiler, runs the dense matmul.
"""
from __future__ import annotations

from pathlib import Path

import torch

from dynasparse.kernels.cpu_extension import built

SOURCE = Path(__file__).with_name("row_sparse_cpu.cpp")
MAX_ROWS = 1  # a decode step at batch 1: with more rows few channels are zero in all of them, and GEMM wins


def usable(x: torch.Tensor, weight_t: torch.Tensor) -> bool:
    """Plain fp32 CPU tensors (not traced), at most ``MAX_ROWS`` rows, and a kernel that built here."""
    return (type(x) is torch.Tensor and x.device.type == "cpu" and x.dtype == weight_t.dtype == torch.float32
            and x.numel() // x.shape[-1] <= MAX_ROWS
            and built("dynasparse_row_sparse_cpu", SOURCE, "the MLP's dense matmul"))


def row_sparse_matmul(x: torch.Tensor, weight_t: torch.Tensor, threshold: float) -> torch.Tensor:
    """``x`` [..., K] (entries below ``threshold`` in magnitude zeroed) @ ``weight_t`` [K, N], skipping the
    weight rows of channels zeroed in every row."""
    out = torch.ops.dynasparse_row_sparse_cpu.row_sparse_matmul(x.reshape(-1, x.shape[-1]), weight_t, threshold)
    return out.view(*x.shape[:-1], weight_t.shape[1])
