"""ONNX translation of the canonical attention op into standard ONNX ops (any ONNX Runtime provider runs
it), and of the ATen ops the exporter has no function for; each technique's translations sit in its own
module and are listed by its record.

Each function is an onnxscript trace-only translation for ``torch.onnx.export``'s
``custom_translation_table``: its signature mirrors the op's schema, and Python control flow on the
op's constant arguments (``is_causal``, ``scale``, whether a mask is given) picks the ONNX subgraph.
"""
from __future__ import annotations

import math

import torch
from onnxscript import ir
from onnxscript import opset18 as op

from dynasparse.ir.ops import ATTENTION


def _static_dim(value, axis: int) -> int | None:
    dim = value.shape[axis] if value.shape is not None else None
    return dim if isinstance(dim, int) else None


def _repeat_heads(x, q):
    """[B, Hkv, L, D] → [B, Hq, L, D]: the ONNX spelling of grouped-query attention.

    Head counts are read with Shape ops unless both are static and equal, so export never depends on
    how well the exporter simplified a symbolic head count.
    """
    q_heads, kv_heads = _static_dim(q, 1), _static_dim(x, 1)
    if q_heads is not None and q_heads == kv_heads:
        return x
    q_heads, kv_heads = op.Shape(q, start=1, end=2), op.Shape(x, start=1, end=2)
    one = op.Constant(value_ints=[1])
    repeated = op.Expand(op.Unsqueeze(x, op.Constant(value_ints=[2])),
                         op.Concat(one, one, op.Div(q_heads, kv_heads), one, one, axis=0))
    target = op.Concat(op.Constant(value_ints=[0]), q_heads, op.Constant(value_ints=[-1]),
                       op.Shape(x, start=3, end=4), axis=0)
    return op.Reshape(repeated, target)


def _scale(q, scale: float | None):
    if scale is None and _static_dim(q, 3) is not None:
        scale = 1.0 / math.sqrt(_static_dim(q, 3))
    if scale is not None:
        return op.CastLike(op.Constant(value_float=scale), q)
    head_dim = op.CastLike(op.Shape(q, start=3, end=4), q)
    return op.Reciprocal(op.Sqrt(head_dim))


def _causal_keep(q, k):
    """Boolean [Lq, Lk] mask, bottom-right aligned like the torch reference."""
    q_len = op.Shape(q, start=2, end=3)
    kv_len = op.Shape(k, start=2, end=3)
    ones = op.ConstantOfShape(op.Concat(q_len, kv_len, axis=0),
                              value=ir.tensor([1], dtype=ir.DataType.INT64))
    return op.Cast(op.Trilu(ones, op.Squeeze(op.Sub(kv_len, q_len)), upper=0), to=ir.DataType.BOOL)


def attention(q, k, v, mask=None, is_causal: bool = False, scale: float | None = None):
    k, v = _repeat_heads(k, q), _repeat_heads(v, q)
    scores = op.Mul(op.MatMul(q, op.Transpose(k, perm=[0, 1, 3, 2])), _scale(q, scale))
    lowest = op.CastLike(op.Constant(value_float=-3.0e38 if q.dtype == ir.DataType.FLOAT else -65504.0), q)
    keep = None  # boolean "may attend"; rows with no allowed key give 0, as torch's SDPA does
    if mask is not None and mask.dtype == ir.DataType.BOOL:
        keep = mask
    elif mask is not None:
        scores = op.Add(scores, op.CastLike(mask, scores))
    if is_causal:
        causal = _causal_keep(q, k)
        keep = causal if keep is None else op.And(keep, causal)
    if keep is None:
        out = op.MatMul(op.Softmax(scores, axis=-1), v)
    else:
        probs = op.Softmax(op.Where(keep, scores, lowest), axis=-1)
        out = op.MatMul(op.Where(keep, probs, op.CastLike(op.Constant(value_float=0.0), probs)), v)
    return op.Transpose(out, perm=[0, 2, 1, 3])  # the op is sequence-major: [B, Lq, Hq, Dv]


def stable_sort(self, stable: bool | None = None, dim: int = -1, descending: bool = False):
    """``torch.sort(..., stable=True)``: ONNX ``TopK`` of every element, which breaks ties by the lower index
    (the ONNX spec), as a stable sort does."""
    axis = dim % len(self.shape)
    count = op.Shape(self, start=axis, end=axis + 1)
    return op.TopK(self, count, axis=axis, largest=int(descending), sorted=1)


ATTENTION_TRANSLATIONS = {ATTENTION: attention, torch.ops.aten.sort.stable: stable_sort}
