"""Small ONNX spellings shared by the translations: constants, run-time dims, dtype limits."""
from __future__ import annotations

import numpy as np
import torch
from onnxscript import ir
from onnxscript import opset18 as op

FLOAT, INT64, BOOL = ir.DataType.FLOAT, ir.DataType.INT64, ir.DataType.BOOL
TORCH_FLOATS = {ir.DataType.FLOAT: torch.float32, ir.DataType.FLOAT16: torch.float16,
                ir.DataType.BFLOAT16: torch.bfloat16, ir.DataType.DOUBLE: torch.float64}


def ints(*values: int):
    """1-D int64 constant (shapes, axes, TopK's k)."""
    return op.Constant(value_ints=list(values))


def int_scalar(value: int):
    """0-D int64 constant (CumSum's axis, scalar operands)."""
    return op.Constant(value_int=value)


def float_scalar(value: float):
    """0-D float32 constant."""
    return op.Constant(value_float=value)


def lowest(dtype: ir.DataType) -> float:
    """``torch.finfo(dtype).min`` for an ONNX float type."""
    return torch.finfo(TORCH_FLOATS.get(dtype, torch.float32)).min


def const_like(value: float, like):
    """A scalar ``value`` in ``like``'s dtype (built in float64 for doubles, so no float32 overflow)."""
    if like.dtype == ir.DataType.DOUBLE:
        return op.Constant(value=ir.tensor(np.array(value, dtype=np.float64)))
    return op.CastLike(float_scalar(value), like)


def dim(x, axis: int):
    """[1] int64: ``x.shape[axis]`` read at run time."""
    return op.Shape(x, start=axis, end=axis + 1)


def as_long(flags):
    return op.Cast(flags, to=INT64)


def key_validity(mask, batch, length):
    """``key_validity``: [B, L] bool, keys some query may attend to (all true without a mask).

    ``batch`` and ``length`` are [1] int64 run-time dims."""
    shape = op.Concat(batch, length, axis=0)
    if mask is None:
        return op.Expand(op.Constant(value=ir.tensor(True)), shape)
    allowed = mask if mask.dtype == BOOL else op.Greater(mask, const_like(lowest(mask.dtype) / 2, mask))
    # Expand is bidirectional, so [B, 1, 1, L] stretches only the batch and key axes, like the reference's
    # expand(batch, m1, m2, L); "any over the two query axes" is a max over 0/1 values.
    one = ints(1)
    allowed = op.Expand(op.Cast(allowed, to=FLOAT), op.Concat(batch, one, one, length, axis=0))
    return op.Cast(op.ReduceMax(allowed, ints(1, 2), keepdims=0), to=BOOL)
