"""ONNX translations of the block-sparse attention ops, in standard ONNX ops only (opset 18).

They spell the torch reference in ``dynasparse.kernels.sparse_attention`` step by step:

  block_plan              pooled Q/K → ``ReduceSum`` of padded, reshaped blocks; scores → ``MatMul``;
                          ranking → ``TopK(k = all blocks)`` (ONNX orders ties by increasing index, as the
                          reference's stable argsort); mass → ``Softmax`` + ``GatherElements`` + ``CumSum``;
                          the sorted id list → a second ascending ``TopK``.
  block_sparse_attention  the CPU path: per query block, ``GatherND`` (batch_dims=2) of the listed K/V blocks,
                          up to the widest row (``ReduceMax`` of the counts, read at run time), masked
                          softmax, ``MatMul``. Work scales with the kept blocks in ONNX Runtime too.

Estimators are spelled one by one in ``SPELLED_ESTIMATORS``; exporting any other of the kernels' ``ESTIMATORS``
is a clear error.
"""
from __future__ import annotations

from onnxscript import ir
from onnxscript import opset18 as op

from dynasparse.errors import DynasparseError
from dynasparse.export.spellings import (BOOL, FLOAT, as_long, const_like, dim, float_scalar, int_scalar, ints,
                                         key_validity, lowest)
from dynasparse.ir.ops import BLOCK_PLAN, BLOCK_SPARSE_ATTENTION


def _blocks_of(length, block_size: int):
    """[1] int64: ceil(length / block_size)."""
    return op.Div(op.Add(length, ints(block_size - 1)), ints(block_size))


def _pad_axis(x, axis: int, rank: int, block_size: int):
    """Zero-pad ``x`` along ``axis`` to a multiple of ``block_size``."""
    length = dim(x, axis)
    extra = op.Sub(op.Mul(_blocks_of(length, block_size), ints(block_size)), length)
    zeros = ints(*([0] * rank))
    ends = [ints(0)] * rank
    ends[axis] = extra
    return op.Pad(x, op.Concat(zeros, *ends, axis=0))


def _scale(q, scale: float | None):
    if scale is not None:
        return float_scalar(scale)
    return op.Reciprocal(op.Sqrt(op.Cast(dim(q, 3), to=FLOAT)))


def _layout(q_len, kv_len, nq, nk, block_size: int, is_causal: bool, sink_blocks: int, local_blocks: int):
    """``block_layout``: (valid, forced, diagonal) with valid/forced [NQ, NK] bool and diagonal [NQ]."""
    rows = op.Range(int_scalar(0), op.Squeeze(nq), int_scalar(1))
    ids = op.Range(int_scalar(0), op.Squeeze(nk), int_scalar(1))
    ends = op.Min(op.Mul(op.Add(rows, ints(1)), ints(block_size)), q_len)
    last = op.Add(op.Sub(ends, ints(1)), op.Sub(kv_len, q_len))
    start = op.Mul(ids, ints(block_size))
    column, row_last = op.Unsqueeze(start, ints(0)), op.Unsqueeze(last, ints(1))
    valid = op.LessOrEqual(column, row_last) if is_causal else op.Expand(
        op.Constant(value=ir.tensor(True)), op.Concat(nq, nk, axis=0))
    diagonal = op.Min(op.Max(op.Div(last, ints(block_size)), ints(0)), op.Sub(nk, ints(1)))
    id_row, diag_col = op.Unsqueeze(ids, ints(0)), op.Unsqueeze(diagonal, ints(1))
    local = op.And(op.LessOrEqual(id_row, diag_col), op.Greater(id_row, op.Sub(diag_col, ints(local_blocks))))
    forced = op.Or(op.Less(id_row, ints(sink_blocks)), local)
    return valid, forced, diagonal


def _keys_per_block(key_valid, batch, nk, block_size: int):
    """``keys_per_block``: [B, NK] float, the real keys of each KV block."""
    return op.ReduceSum(op.Reshape(_pad_axis(key_valid, 1, 2, block_size),
                                   op.Concat(batch, nk, ints(block_size), axis=0)), ints(2), keepdims=0)


def _pooled_scores(q, k, key_valid, keys, nq, nk, diagonal, block_size: int, scale):
    """``pooled_scores``: [B, Hkv, NQ, NK]; -inf for blocks without real keys."""
    batch, q_heads, q_len, head_dim = dim(q, 0), dim(q, 1), dim(q, 2), dim(q, 3)
    kv_heads = dim(k, 1)
    groups = op.Div(q_heads, kv_heads)
    q_blocks = op.Reshape(_pad_axis(q, 2, 4, block_size),
                          op.Concat(batch, kv_heads, groups, nq, ints(block_size), head_dim, axis=0))
    rows = op.Range(int_scalar(0), op.Squeeze(nq), int_scalar(1))
    real_rows = op.Min(op.Sub(q_len, op.Mul(rows, ints(block_size))), ints(block_size))
    divisor = op.Cast(op.Mul(real_rows, groups), to=FLOAT)
    q_pooled = op.Div(op.ReduceSum(q_blocks, ints(2, 4), keepdims=0), op.Unsqueeze(divisor, ints(1)))
    weights = op.Unsqueeze(key_valid, ints(1, 3))  # [B, 1, Lk, 1]
    k_sums = op.ReduceSum(op.Reshape(_pad_axis(op.Mul(k, weights), 2, 4, block_size),
                                     op.Concat(batch, kv_heads, nk, ints(block_size), head_dim, axis=0)),
                          ints(3), keepdims=0)
    at_least_one = op.Max(keys, float_scalar(1.0))
    k_pooled = op.Div(k_sums, op.Unsqueeze(at_least_one, ints(1, 3)))
    scores = op.Add(op.Mul(op.MatMul(q_pooled, op.Transpose(k_pooled, perm=[0, 1, 3, 2])), scale),
                    op.Unsqueeze(op.Log(at_least_one), ints(1, 2)))
    empty = op.Unsqueeze(op.Equal(keys, float_scalar(0.0)), ints(1, 2))
    return op.Where(empty, float_scalar(float("-inf")), scores)


def _streaming_scores(q, k, key_valid, keys, nq, nk, diagonal, block_size: int, scale):
    """``streaming_scores``: [NQ, NK], minus each block's distance from the row's diagonal block."""
    ids = op.Range(int_scalar(0), op.Squeeze(nk), int_scalar(1))
    distance = op.Abs(op.Sub(op.Unsqueeze(diagonal, ints(1)), op.Unsqueeze(ids, ints(0))))
    return op.Neg(op.Cast(distance, to=FLOAT))


# The estimators of ``dynasparse.kernels.estimators.ESTIMATORS`` that have an ONNX spelling, by name.
SPELLED_ESTIMATORS = {"pooled": _pooled_scores, "streaming": _streaming_scores}


def block_plan(q, k, mask=None, is_causal: bool = False, scale: float | None = None, block_size: int = 64,
               estimator: str = "pooled", selector: str = "keep_ratio", amount: float = 1.0, sink_blocks: int = 1,
               local_blocks: int = 1, min_seq_len: int = 0, window: int = 64):
    if estimator not in SPELLED_ESTIMATORS:
        raise DynasparseError(f"SparseAttentionConfig(estimator={estimator!r}) has no ONNX translation; export "
                              f"with estimator={' or '.join(map(repr, SPELLED_ESTIMATORS))}")
    q, k = op.Cast(q, to=FLOAT), op.Cast(k, to=FLOAT)
    batch, q_len, kv_len = dim(q, 0), dim(q, 2), dim(k, 2)
    nq, nk = _blocks_of(q_len, block_size), _blocks_of(kv_len, block_size)
    valid, forced, diagonal = _layout(q_len, kv_len, nq, nk, block_size, is_causal, sink_blocks, local_blocks)
    key_valid = op.Cast(key_validity(mask, batch, kv_len), to=FLOAT)
    keys = _keys_per_block(key_valid, batch, nk, block_size)
    scores = SPELLED_ESTIMATORS[estimator](q, k, key_valid, keys, nq, nk, diagonal, block_size, _scale(q, scale))
    scores = op.Expand(scores, op.Concat(batch, dim(k, 1), nq, nk, axis=0))
    has_keys = op.Unsqueeze(op.Greater(keys, float_scalar(0.0)), ints(1, 2))  # [B, 1, 1, NK]
    valid = op.And(op.Unsqueeze(valid, ints(0, 1)), has_keys)
    forced = op.And(op.Unsqueeze(forced, ints(0, 1)), valid)
    selectable = op.And(valid, op.Or(forced, op.Greater(scores, float_scalar(float("-inf")))))
    selectable = op.Expand(selectable, op.Shape(scores))
    ranked = op.Where(forced, float_scalar(float("inf")), op.Where(selectable, scores, float_scalar(float("-inf"))))
    _, order = op.TopK(ranked, nk, axis=-1, largest=1, sorted=1)

    n_valid = op.ReduceSum(as_long(op.Expand(valid, op.Shape(scores))), ints(-1), keepdims=0)
    if selector == "topk":
        wanted = op.Expand(ints(int(amount)), op.Shape(n_valid))
    elif selector == "keep_ratio":
        wanted = as_long(op.Ceil(op.Sub(op.Mul(op.Cast(n_valid, to=FLOAT), float_scalar(amount)),
                                         float_scalar(1e-6))))
    else:
        finite = op.Where(selectable, scores, float_scalar(-1e30))
        probs = op.Mul(op.Softmax(finite, axis=-1), op.Cast(selectable, to=FLOAT))
        before = op.CumSum(op.GatherElements(probs, order, axis=-1), int_scalar(-1), exclusive=1)
        wanted = op.ReduceSum(as_long(op.Less(before, float_scalar(amount - 1e-6))), ints(-1), keepdims=0)
    dense = op.Less(kv_len, ints(min_seq_len))  # short sequences keep every valid block
    wanted = op.Where(dense, n_valid, wanted)
    n_forced = op.ReduceSum(as_long(op.Expand(forced, op.Shape(scores))), ints(-1), keepdims=0)
    counts = op.Min(op.Max(wanted, n_forced), op.ReduceSum(as_long(selectable), ints(-1), keepdims=0))

    rank = op.Range(int_scalar(0), op.Squeeze(nk), int_scalar(1))
    in_plan = op.Less(rank, op.Unsqueeze(counts, ints(-1)))
    chosen = op.Where(in_plan, order, nk)
    ascending, _ = op.TopK(chosen, nk, axis=-1, largest=0, sorted=1)
    indices = op.Where(in_plan, ascending, ints(0))
    return op.Cast(counts, to=ir.DataType.INT32), op.Cast(indices, to=ir.DataType.INT32)


def block_sparse_attention(q, k, v, mask, counts, indices, is_causal: bool = False, scale: float | None = None,
                           block_size: int = 64, min_seq_len: int = 0, decode_keep: float = 1.0):
    if decode_keep < 1.0:
        raise DynasparseError(f"SparseAttentionConfig(decode_keep={decode_keep}) selects keys per decode step, "
                              "which has no ONNX spelling yet; export with decode_keep=1.0")
    bs = block_size
    batch, q_heads, q_len, head_dim = dim(q, 0), dim(q, 1), dim(q, 2), dim(q, 3)
    kv_heads, kv_len, dim_v = dim(k, 1), dim(k, 2), dim(v, 3)
    groups = op.Div(q_heads, kv_heads)
    nq, nk = _blocks_of(q_len, bs), _blocks_of(kv_len, bs)
    counts, indices = as_long(counts), as_long(indices)
    width = op.Reshape(op.Max(op.ReduceMax(counts, keepdims=0), int_scalar(1)), ints(1))  # widest row (>= 1)
    ids = op.Slice(indices, ints(0), width, ints(3))  # [B, Hkv, NQ, W]
    wide = op.Mul(width, ints(bs))

    def gather_blocks(x, last):
        blocks = op.Reshape(_pad_axis(x, 2, 4, bs), op.Concat(batch, kv_heads, nk, ints(bs), last, axis=0))
        picked = op.GatherND(blocks, op.Unsqueeze(ids, ints(-1)), batch_dims=2)  # [B, Hkv, NQ, W, bs, D]
        return op.Reshape(picked, op.Concat(batch, kv_heads, nq, wide, last, axis=0))

    keys, values = gather_blocks(k, head_dim), gather_blocks(v, dim_v)
    queries = op.Reshape(_pad_axis(q, 2, 4, bs), op.Concat(batch, kv_heads, groups, nq, ints(bs), head_dim, axis=0))
    queries = op.Reshape(op.Transpose(queries, perm=[0, 1, 3, 2, 4, 5]),
                         op.Concat(batch, kv_heads, nq, op.Mul(groups, ints(bs)), head_dim, axis=0))
    scores = op.Mul(op.MatMul(queries, op.Transpose(keys, perm=[0, 1, 2, 4, 3])),
                    op.CastLike(_scale(q, scale), q))  # [B, Hkv, NQ, G*bs, W*bs]

    within = op.Range(int_scalar(0), int_scalar(bs), int_scalar(1))
    key_pos = op.Reshape(op.Add(op.Mul(op.Unsqueeze(ids, ints(-1)), ints(bs)), within),
                         op.Concat(batch, kv_heads, nq, wide, axis=0))  # [B, Hkv, NQ, W*bs]
    slot = op.Range(int_scalar(0), op.Squeeze(width), int_scalar(1))
    listed = op.Less(slot, op.Unsqueeze(counts, ints(-1)))  # [B, Hkv, NQ, W]
    listed = op.Reshape(op.Expand(op.Unsqueeze(listed, ints(-1)), op.Concat(batch, kv_heads, nq, width,
                                                                           ints(bs), axis=0)),
                        op.Concat(batch, kv_heads, nq, wide, axis=0))
    keep = op.Unsqueeze(op.And(listed, op.Less(key_pos, kv_len)), ints(3))  # [B, Hkv, NQ, 1, W*bs]
    if is_causal:
        rows = op.Range(int_scalar(0), op.Squeeze(op.Mul(op.Mul(nq, groups), ints(bs))), int_scalar(1))
        rows = op.Reshape(rows, op.Concat(nq, op.Mul(groups, ints(bs)), axis=0))  # [NQ, G*bs] running index
        block_row = op.Div(rows, op.Mul(groups, ints(bs)))
        q_pos = op.Add(op.Add(op.Mul(block_row, ints(bs)), op.Mod(rows, ints(bs))), op.Sub(kv_len, q_len))
        visible = op.LessOrEqual(op.Unsqueeze(key_pos, ints(3)), op.Unsqueeze(q_pos, ints(-1)))
        keep = op.And(keep, visible)
    if mask is not None:
        full = op.Expand(mask, op.Concat(batch, q_heads, q_len, kv_len, axis=0))
        rows = op.Reshape(_pad_axis(full, 2, 4, bs), op.Concat(batch, kv_heads, groups, nq, ints(bs), kv_len,
                                                             axis=0))
        rows = op.Reshape(op.Transpose(rows, perm=[0, 1, 3, 2, 4, 5]),
                          op.Concat(batch, kv_heads, nq, op.Mul(groups, ints(bs)), kv_len, axis=0))
        columns = op.Min(op.Unsqueeze(key_pos, ints(3)), op.Sub(kv_len, ints(1)))
        columns = op.Expand(columns, op.Concat(batch, kv_heads, nq, op.Mul(groups, ints(bs)), wide, axis=0))
        picked = op.GatherElements(rows, columns, axis=-1)
        if mask.dtype == BOOL:
            keep = op.And(keep, picked)
        else:
            scores = op.Add(scores, op.CastLike(picked, scores))
    keep = op.Expand(keep, op.Shape(scores))
    floor = const_like(lowest(q.dtype) if q.dtype != ir.DataType.DOUBLE else -1e300, scores)
    probs = op.Softmax(op.Where(keep, scores, floor), axis=-1)
    probs = op.Where(keep, probs, op.CastLike(float_scalar(0.0), probs))  # a row with nothing allowed gives 0
    out = op.MatMul(probs, values)  # [B, Hkv, NQ, G*bs, Dv]
    out = op.Reshape(out, op.Concat(batch, kv_heads, nq, groups, ints(bs), dim_v, axis=0))
    out = op.Reshape(op.Transpose(out, perm=[0, 2, 4, 1, 3, 5]),
                     op.Concat(batch, op.Mul(nq, ints(bs)), q_heads, dim_v, axis=0))
    return op.Slice(out, ints(0), q_len, ints(1))  # sequence-major [B, Lq, Hq, Dv]


SPARSE_ATTENTION_TRANSLATIONS = {BLOCK_PLAN: block_plan, BLOCK_SPARSE_ATTENTION: block_sparse_attention}
