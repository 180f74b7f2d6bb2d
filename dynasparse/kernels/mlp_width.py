"""Per-token MLP width: each token's MLP matmuls read only the input channels whose magnitude clears a
threshold (TEAL, CATS). A channel below it contributes ``x_i * W[:, i]``, small for every output, so
zeroing it changes little. ``row_sparse_linear`` is the thresholded matmul in one op: on CPU, for a
decode step's row, it skips the weight rows (of an input-major copy) of every channel below the threshold
(``row_sparse_cpu``); elsewhere it zeroes them and runs the dense matmul. ``threshold`` 0 keeps every channel.
"""
from __future__ import annotations

import functools
import math

import torch

from dynasparse.kernels import row_sparse_cpu


def sparsify_reference(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``x`` with its entries of magnitude below ``threshold`` (a scalar) set to zero."""
    return torch.where(x.abs() < threshold.to(x.dtype), torch.zeros((), dtype=x.dtype, device=x.device), x)


def sparsify(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``sparsify_reference``, in one pass over ``x`` where it can be: ATen's ``hardshrink`` zeroes what lies at
    or below its bound, and the largest float below ``threshold`` makes that "below ``threshold``". The
    reference's compare-and-select is three passes, which in prefill cost most of a matmul's time. The bound
    is read on the host, so this path is for plain fp32 / fp64 CPU tensors; traced or elsewhere, the reference."""
    if (type(x) is torch.Tensor and type(threshold) is torch.Tensor and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64)):
        return torch.nn.functional.hardshrink(x, _just_below(float(threshold), x.dtype))
    return sparsify_reference(x, threshold)


@functools.lru_cache(maxsize=4096)  # a model has a few hundred thresholds, set once by fit
def _just_below(value: float, dtype: torch.dtype) -> float:
    """The largest ``dtype`` float below ``value`` (computed once per value: a decode step calls ``sparsify``
    about a hundred times)."""
    return float(torch.nextafter(torch.tensor(value, dtype=dtype), torch.tensor(-math.inf, dtype=dtype)))


def threshold_for(magnitudes: torch.Tensor, share: float) -> torch.Tensor:
    """The threshold below which ``share`` of ``magnitudes`` (sorted, 1-D) fall: 0 for a share of 0."""
    if share <= 0:
        return torch.zeros(())
    return magnitudes[min(int(share * magnitudes.numel()), magnitudes.numel() - 1)].float()


def row_sparse_linear(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None,
                      threshold: torch.Tensor) -> torch.Tensor:
    """``sparsify(x, threshold) @ weight_t + bias`` (``weight_t`` [K, N]: input-major, as ``Conv1D`` stores
    it, or a linear's weight transposed once)."""
    if row_sparse_cpu.usable(x, weight_t):
        out = row_sparse_cpu.row_sparse_matmul(x, weight_t, float(threshold))
    else:
        out = sparsify(x, threshold) @ weight_t
    return out if bias is None else out + bias
