"""ONNX translation of the cache step, and the export of a KV-cache decoder as a step function.

``kv_cache_attention_functional`` is spelled in standard ops, following ``kernels/kv_cache.py``:

  attention   grouped queries ``Reshape`` to [B, Hkv, G·T, D]; ``MatMul`` against the slots and the new
              keys; one ``Softmax`` over both (empty slots and masked keys zeroed); ``MatMul`` with V.
  score       masses ``ReduceSum`` over the group's observed queries; the policy's update (``AveragePool``
              for SnapKV's pooling).
  evict       ``TopK(T, largest=0)`` of the priorities drops T candidates; the r-th freed slot is matched
              to the r-th kept new token by comparing ranks (``CumSum``); ``ScatterElements`` writes them.

The exported decoder (``passes.kv_eviction.step_graph``) takes the cache as explicit inputs
(``kv<i>_<field>``) and returns the updated cache after the logits, so ONNX Runtime owns the state between
steps.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

from onnxscript import ir
from onnxscript import opset18 as op
from torch.export import Dim

from dynasparse.export.spellings import (BOOL, FLOAT, INT64, as_long, const_like, dim, float_scalar, ints,
                                         lowest)
from dynasparse.export.program import onnx_program
from dynasparse.errors import DynasparseError
from dynasparse.ir.nodes import bound_args
from dynasparse.ir.ops import KV_CACHE_ATTENTION_FUNCTIONAL, KV_CACHE_SPARSE_ATTENTION
from dynasparse.kernels.kv_cache import STATE_FIELDS, empty_state
from dynasparse.passes.kv_eviction import step_graph
from dynasparse.plans import CACHE_META, KV_METADATA



def _token_validity(mask, is_causal: bool, q, length):
    """([B, T] real keys, [B, T] real queries) as int64 0/1, like ``token_validity``."""
    batch = dim(q, 0)
    if mask is None:
        ones = op.Expand(op.Constant(value=ir.tensor(1, dtype=INT64)), op.Concat(batch, length, axis=0))
        return ones, ones
    allowed = mask if mask.dtype == BOOL else op.Greater(mask, const_like(lowest(mask.dtype) / 2, mask))
    if is_causal:
        allowed = op.And(allowed, _causal(length))
    allowed = op.Expand(op.Cast(allowed, to=FLOAT), op.Concat(batch, ints(1), length, length, axis=0))
    keys = op.ReduceMax(allowed, ints(1, 2), keepdims=0)
    queries = op.ReduceMax(allowed, ints(1, 3), keepdims=0)
    return as_long(keys), as_long(queries)


def _causal(length):
    ones = op.ConstantOfShape(op.Concat(length, length, axis=0), value=ir.tensor([1], dtype=INT64))
    return op.Cast(op.Trilu(ones, upper=0), to=BOOL)


def _observed(policy: str, query_valid, window: int):
    """[B, T] float weights of the queries the policy reads."""
    if policy in ("tova", "snapkv"):
        count = 1 if policy == "tova" else window
        from_end = op.CumSum(query_valid, op.Constant(value_int=1), reverse=1)
        return op.Cast(op.Mul(query_valid, as_long(op.LessOrEqual(from_end, ints(count)))), to=FLOAT)
    return op.Cast(query_valid, to=FLOAT)


def _pooled(mass_new, pool: int):
    """avg_pool1d over the new keys (stride 1, same length, padding not counted)."""
    shape = op.Shape(mass_new)
    flat = op.Reshape(mass_new, op.Concat(ints(-1, 1), dim(mass_new, 2), axis=0))
    pooled = op.AveragePool(flat, kernel_shape=[pool], strides=[1], pads=[pool // 2, pool // 2],
                            count_include_pad=0)
    return op.Reshape(op.Slice(pooled, ints(0), dim(mass_new, 2), ints(2)), shape)


def kv_cache_attention_functional(q, k, v, mask, is_causal: bool, scale, keys, values, positions, scores, seen,
                                  policy: str, sink: int, recent: int, window: int, pool: int):
    length, slots = dim(q, 2), dim(keys, 2)
    capacity = op.Sub(slots, ints(1))
    kv_heads, head_dim = dim(k, 1), dim(q, 3)
    groups = op.Div(dim(q, 1), kv_heads)
    scale_value = float_scalar(scale) if scale is not None else op.Reciprocal(op.Sqrt(op.Cast(head_dim, to=FLOAT)))
    masked_score = float_scalar(-3.0e38)
    key_valid, query_valid = _token_validity(mask, is_causal, q, length)

    # attention over the slots and the new keys, in float32
    grouped = op.Concat(ints(0), kv_heads, ints(-1), head_dim, axis=0)
    qg = op.Reshape(op.Cast(q, to=FLOAT), grouped)
    s_cache = op.Mul(op.MatMul(qg, op.Transpose(op.Cast(keys, to=FLOAT), perm=[0, 1, 3, 2])), scale_value)
    keep_cache = op.Unsqueeze(op.GreaterOrEqual(positions, ints(0)), ints(2))
    keep_cache = op.Expand(keep_cache, op.Shape(s_cache))
    s_new = op.Mul(op.MatMul(qg, op.Transpose(op.Cast(k, to=FLOAT), perm=[0, 1, 3, 2])), scale_value)
    keep_new = None
    if mask is not None and mask.dtype != BOOL:
        full = op.Expand(op.Cast(mask, to=FLOAT), op.Concat(dim(q, 0), dim(q, 1), length, length, axis=0))
        s_new = op.Add(s_new, op.Reshape(full, op.Concat(ints(0), kv_heads, ints(-1), length, axis=0)))
    elif mask is not None:
        keep_new = mask
    if is_causal:
        keep_new = _causal(length) if keep_new is None else op.And(keep_new, _causal(length))
    if keep_new is None:
        keep_new = op.Constant(value=ir.tensor(True))
    keep_new = op.Expand(keep_new, op.Concat(dim(q, 0), dim(q, 1), length, length, axis=0))
    keep_new = op.Reshape(keep_new, op.Concat(ints(0), kv_heads, ints(-1), length, axis=0))
    keep = op.Concat(keep_cache, keep_new, axis=-1)
    probs = op.Softmax(op.Where(keep, op.Concat(s_cache, s_new, axis=-1), masked_score), axis=-1)
    probs = op.Where(keep, probs, float_scalar(0.0))
    p_cache = op.Slice(probs, ints(0), slots, ints(3))
    p_new = op.Slice(probs, slots, ints(2**62), ints(3))
    out = op.Add(op.MatMul(p_cache, op.Cast(values, to=FLOAT)), op.MatMul(p_new, op.Cast(v, to=FLOAT)))
    out = op.Reshape(out, op.Concat(ints(0), dim(q, 1), length, ints(-1), axis=0))
    out = op.CastLike(op.Transpose(out, perm=[0, 2, 1, 3]), q)

    # score: the policy's update of every candidate
    running = op.Sub(op.Add(op.Unsqueeze(seen, ints(1)), op.CumSum(key_valid, op.Constant(value_int=1))), ints(1))
    step_pos = op.Where(op.Cast(key_valid, to=BOOL), running, ints(-1))  # [B, T]
    step_pos_heads = op.Expand(op.Unsqueeze(step_pos, ints(1)), op.Concat(dim(q, 0), kv_heads, length, axis=0))
    if policy in ("full", "streaming"):
        cache_scores, new_scores = op.Cast(positions, to=FLOAT), op.Cast(step_pos_heads, to=FLOAT)
    else:
        weights = op.Tile(_observed(policy, query_valid, window), op.Concat(ints(1), groups, axis=0))
        weights = op.Unsqueeze(weights, ints(1, 3))
        mass_cache = op.ReduceSum(op.Mul(p_cache, weights), ints(2), keepdims=0)
        mass_new = op.ReduceSum(op.Mul(p_new, weights), ints(2), keepdims=0)
        if policy == "h2o":
            cache_scores, new_scores = op.Add(scores, mass_cache), mass_new
        else:
            cache_scores = mass_cache
            new_scores = _pooled(mass_new, pool) if policy == "snapkv" and pool > 1 else mass_new
    seen_after = op.Add(seen, op.ReduceSum(key_valid, ints(1), keepdims=0))

    # evict: drop the T lowest-priority candidates; kept new tokens overwrite freed slots
    cand_pos = op.Concat(op.Slice(positions, ints(0), capacity, ints(2)), step_pos_heads, axis=-1)
    cand_scores = op.Concat(op.Slice(cache_scores, ints(0), capacity, ints(2)), new_scores, axis=-1)
    recent_from = op.Sub(op.Unsqueeze(seen_after, ints(1, 2)), ints(recent))
    protected = op.Or(op.Less(cand_pos, ints(sink)), op.GreaterOrEqual(cand_pos, recent_from))
    priority = op.Where(protected, float_scalar(math.inf), cand_scores)
    priority = op.Where(op.Less(cand_pos, ints(0)), float_scalar(-math.inf), priority)
    _, dropped_index = op.TopK(priority, length, axis=-1, largest=0)
    dropped = op.ScatterElements(op.ConstantOfShape(op.Shape(priority), value=ir.tensor([0], dtype=INT64)),
                                 dropped_index, op.Expand(ints(1), op.Shape(dropped_index)), axis=-1)
    freed = op.Slice(dropped, ints(0), capacity, ints(2))
    kept_new = op.Sub(ints(1), op.Slice(dropped, capacity, ints(2**62), ints(2)))
    freed_rank = op.Where(op.Cast(freed, to=BOOL), op.CumSum(freed, op.Constant(value_int=2)), ints(0))
    new_rank = op.Where(op.Cast(kept_new, to=BOOL), op.CumSum(kept_new, op.Constant(value_int=2)), ints(-1))
    match = op.Equal(op.Unsqueeze(freed_rank, ints(3)), op.Unsqueeze(new_rank, ints(2)))  # [B, Hkv, C, T]
    matched = op.Cast(op.ReduceMax(op.Cast(match, to=INT64), ints(2), keepdims=0), to=BOOL)
    target = op.Where(matched, op.ArgMax(op.Cast(match, to=INT64), axis=2, keepdims=0), capacity)  # [B, Hkv, T]
    wide = op.Unsqueeze(target, ints(3))
    keys_out = op.ScatterElements(keys, op.Expand(wide, op.Shape(k)), op.CastLike(k, keys), axis=2)
    values_out = op.ScatterElements(values, op.Expand(wide, op.Shape(v)), op.CastLike(v, values), axis=2)
    written = op.Where(matched, step_pos_heads, ints(-1))
    positions_out = op.ScatterElements(positions, target, written, axis=2)
    positions_out = op.Concat(op.Slice(positions_out, ints(0), capacity, ints(2)),
                              op.Expand(ints(-1), op.Concat(dim(q, 0), kv_heads, ints(1), axis=0)), axis=2)
    scores_out = op.ScatterElements(cache_scores, target, new_scores, axis=2)
    return out, keys_out, values_out, positions_out, scores_out, seen_after


KV_CACHE_TRANSLATIONS = {KV_CACHE_ATTENTION_FUNCTIONAL: kv_cache_attention_functional}


def export_decoder_step(model, path: Path, args: tuple, kwargs: dict, opset_version: int) -> Path:
    """A KV-cache decoder exports as one step: (inputs, cache) → (outputs, updated cache).

    Batch, new tokens and cache slots stay dynamic; the config and the cache layout go into the file's
    metadata, so ``dynasparse.generate`` can drive the ONNX Runtime session with its own cache.
    """
    plan = model.graph_module.meta[CACHE_META]
    sparse = [node for node in model.graph_module.graph.nodes if node.target is KV_CACHE_SPARSE_ATTENTION]
    for node in sparse:
        if bound_args(node)["decode_keep"] < 1.0:
            raise DynasparseError(f"query-aware decode (decode_keep={bound_args(node)['decode_keep']}) has no "
                                  "ONNX spelling yet; export the decoder with SparseAttentionConfig.decode_keep=1.0")
    if sparse:
        warnings.warn(f"{len(sparse)} cache sites plan sparse prefill chunks, which have no ONNX spelling yet: the "
                      "exported step reads every block (dense prefill, same cache and eviction); torch runs them "
                      "sparse", stacklevel=2)
    step, input_names, output_names = step_graph(model.graph_module, plan, functional=True)
    inputs = list(args) + [kwargs[name] for name in model.layout.captured[len(args):]]
    batch = inputs[0].shape[0]
    states = [empty_state(batch, s.num_kv_heads, 8, s.head_dim, s.value_dim, s.dtype) for s in plan.sites]
    cache = [state[field] for state in states for field in STATE_FIELDS]
    auto = Dim.AUTO
    dynamic = [{0: auto, 1: auto} if t.dim() >= 2 else {0: auto} for t in inputs]
    for state in states:
        dynamic += [{0: auto, 2: auto}, {0: auto, 2: auto}, {0: auto, 2: auto}, {0: auto, 2: auto}, {0: auto}]
    # no onnxscript optimizer pass: its rewriter takes minutes on a 30-layer decoder step (a graph per
    # layer for the cache), and ONNX Runtime optimizes the graph itself when it loads it
    program = onnx_program(step, tuple(inputs + cache), {}, tuple(dynamic), opset_version, optimize=False,
                            input_names=input_names, output_names=output_names)
    program.model.metadata_props[KV_METADATA] = json.dumps({
        "config": plan.config.to_dict(),
        "sites": [{"policy": s.policy, "num_kv_heads": s.num_kv_heads, "head_dim": s.head_dim,
                   "value_dim": s.value_dim, "dtype": str(s.dtype).removeprefix("torch.")} for s in plan.sites]})
    program.save(str(path))
    return path
