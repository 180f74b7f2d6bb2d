"""ONNX translation of ``merge_tokens``, in standard ONNX ops only (opset 18): its plan is data-dependent, so
the torch reference cannot be traced; the other token-merge ops export by lowering their torch references.

Why standard ops: a custom domain would tie the exported file to one runtime, while plain ONNX runs on
every ONNX Runtime execution provider (and any other ONNX runtime). The translations reproduce the torch
reference in ``dynasparse.kernels.token_merge`` step by step, with the same roles, tie-breaking, slot
placement and weights; each helper names the reference line it spells:

  ``argsort(stable=True)``   → ``TopK(k = the row length, sorted=1)``. ONNX specifies TopK's tie order: equal
                               values come out by increasing index, for ``largest=1`` and ``largest=0``
                               alike, which is exactly torch's stable ascending / descending argsort (and
                               ORT's CPU kernel follows it), so no epsilon or combined key is needed;
  inverse permutation (rank) → ``ScatterElements`` of a ``Range`` (a permutation: no duplicate indices);
  ``cumsum``                 → ``CumSum``;   ``gather`` → ``GatherElements``;   ``masked_fill`` → ``Where``;
  ``scatter_add``            → ``ScatterElements(reduction="add")`` of size-weighted sums, divided by the
                               summed sizes afterwards — never ``ScatterReduce(mean)``, which ONNX lacks and
                               which would also weigh a merged token of size 5 like one of size 1;
  ``max(dim)``               → ``ReduceMax`` + ``ArgMax`` (first index on ties, as torch's CPU max);
  capacity                   → the integer formula of ``merged_capacity`` on int64 Shape values (``//`` of
                               non-negative ints is ONNX's int64 ``Div``).

A row too short for the scheduled merges merges as far as it can, in both (``r_row`` is capped by its
candidates and the capacity keeps room for that). Results agree with PyTorch up to float rounding; a rounding difference can only change a decision when two
similarities (or importances) are within a few ulps of each other, which real inputs practically never hit.
"""
from __future__ import annotations

from onnxscript import ir
from onnxscript import opset18 as op

from dynasparse.export.spellings import FLOAT, INT64, as_long, dim, float_scalar, int_scalar, ints
from dynasparse.ir.ops import MERGE_TOKENS

def _rank(flags):
    """``_rank``: flags.long().cumsum(1) - 1 (position among the set flags of the row)."""
    return op.Sub(op.CumSum(as_long(flags), int_scalar(1)), int_scalar(1))


def _row_count(flags):
    """[B, 1] int64: how many flags of each row are set."""
    return op.ReduceSum(as_long(flags), ints(1), keepdims=1)


def _positions(x):
    """[B, L] int64: 0..L-1 in every row (``torch.arange(L).expand(B, -1)``)."""
    length = op.Squeeze(dim(x, 1), ints(0))
    row = op.Range(int_scalar(0), length, int_scalar(1))
    return op.Expand(op.Unsqueeze(row, ints(0)), op.Concat(dim(x, 0), dim(x, 1), axis=0))


def _sort_rank(score, descending: bool):
    """[B, L] int64: each slot's position in ``score.argsort(dim=1, descending=..., stable=True)``.

    TopK with k = L is a full sort; ONNX breaks ties by lower index first in both directions, which is
    torch's stable order. The inverse permutation scatters 0..L-1 to the sorted order's indices.
    """
    _, order = op.TopK(score, dim(score, 1), axis=1, largest=int(descending), sorted=1)
    return op.ScatterElements(op.ConstantOfShape(op.Shape(order), value=ir.tensor([0], dtype=INT64)),
                              order, _positions(score), axis=1)


def _scheduled(valid_count, r: int, ratio_milli: int):
    """``scheduled_merges``: the constant ``r``, or (valid_count - r) · ratio_milli // 1000 per row.

    ONNX's integer Div truncates where Python floors; they differ only for negative counts (rows shorter
    than ``r``), which every caller clamps to 0.
    """
    if ratio_milli < 0:
        return int_scalar(r)
    return op.Div(op.Mul(op.Sub(valid_count, int_scalar(r)), int_scalar(ratio_milli)), int_scalar(1000))


def _floor_schedule(r: int, ratio_milli: int, r_min_milli: int) -> tuple[int, int]:
    """Threshold mode's guaranteed share of the schedule (as in ``merged_capacity``)."""
    return (r * r_min_milli // 1000, -1) if ratio_milli < 0 else (r, ratio_milli * r_min_milli // 1000)


def _capacity(length, r: int, ratio_milli: int, mode: str, fuse: bool, r_min_milli: int, protected: int):
    """``merged_capacity`` on a [1] int64 length; the Python ints fold into constants."""
    if mode == "threshold":
        r, ratio_milli = _floor_schedule(r, ratio_milli, r_min_milli)
    if ratio_milli < 0:
        most_kept = (int_scalar(protected) if mode == "prune"
                     else op.Div(op.Add(length, int_scalar(protected)), int_scalar(2)))
        kept = op.Max(op.Sub(length, int_scalar(r)), most_kept)
    else:
        kept = op.Div(op.Add(op.Mul(length, int_scalar(1000 - ratio_milli)), int_scalar(r * ratio_milli + 999)), int_scalar(1000))
    return op.Add(kept, int_scalar(1)) if mode == "prune" and fuse else kept


# --- merge_init ------------------------------------------------------------------------------------------------

def _encode(slot, real):
    """The ``source`` encoding: the slot for real tokens, ``-(slot + 1)`` for padding."""
    return op.Where(real, slot, op.Sub(op.Neg(slot), int_scalar(1)))


def _slot_of(source):
    """``slot_of``: decode ``source`` to plain slot indices."""
    return op.Where(_is_real(source), source, op.Sub(op.Neg(source), int_scalar(1)))


def _is_real(source):
    return op.GreaterOrEqual(source, int_scalar(0))


# --- merge_tokens ----------------------------------------------------------------------------------------------

def _best_match(metric, is_src, is_dst):
    """``best_match_reference``: cosine similarity of each src to its most similar dst, and that dst."""
    unit = op.Div(metric, op.Max(op.ReduceL2(metric, ints(-1), keepdims=1), float_scalar(1e-12)))
    scores = op.MatMul(unit, op.Transpose(unit, perm=[0, 2, 1]))
    minus_inf = float_scalar(float("-inf"))
    scores = op.Where(op.Unsqueeze(is_dst, ints(1)), scores, minus_inf)
    best = op.Where(is_src, op.ReduceMax(scores, ints(-1), keepdims=0), minus_inf)
    index = op.Where(is_src, op.ArgMax(scores, axis=-1, keepdims=0, select_last_index=0), int_scalar(0))
    return best, index


def _protected(size, source, protect: list[int]):
    """[B, L] bool: the slots holding a protected token; ``protect`` counts real tokens (0: the first, CLS).

    A slot is protected when any wanted token sits in it. Spelled as a sum-scatter of the wanted flags so
    the many unwanted tokens (sent to slot 0 with flag 0) can never overwrite a wanted one there: a plain
    scatter with repeated indices keeps whichever write comes last (torch's CPU ``scatter_`` does, and would
    unprotect a CLS held in slot 0), and ONNX leaves that order undefined.
    """
    if not protect:
        return None
    real = _is_real(source)
    real_rank = _rank(real)
    named = op.Equal(real_rank, int_scalar(protect[0]))
    for position in protect[1:]:  # torch.isin(rank, protect)
        named = op.Or(named, op.Equal(real_rank, int_scalar(position)))
    wanted = op.And(real, named)
    marks = op.ScatterElements(op.ConstantOfShape(op.Shape(size), value=ir.tensor([0.0], dtype=FLOAT)),
                               op.Where(wanted, source, int_scalar(0)), op.Cast(wanted, to=FLOAT),
                               axis=1, reduction="add")
    return op.Greater(marks, float_scalar(0.0))


def _plan(metric, size, source, importance, r: int, ratio_milli: int, protect: list[int], mode: str,
          threshold: float, r_min_milli: int, fuse: bool, capacity):
    """``plan_merge``: ([B, L] int64 target slot, [B, L] float weight)."""
    valid = op.Greater(size, float_scalar(0.0))
    protected = _protected(size, source, protect)
    candidate = valid if protected is None else op.And(valid, op.Not(protected))
    rank = _rank(candidate)
    valid_count, candidates = _row_count(valid), _row_count(candidate)
    most = candidates if mode == "prune" else op.Div(op.Add(candidates, int_scalar(1)), int_scalar(2))
    r_row = op.Max(op.Min(_scheduled(valid_count, r, ratio_milli), most), int_scalar(0))

    if mode == "prune":
        score = op.Where(candidate, op.Cast(importance, to=FLOAT), float_scalar(float("inf")))
        removed = op.And(candidate, op.Less(_sort_rank(score, descending=False), r_row))
        best_dst = None
    else:
        parity = op.Mod(rank, int_scalar(2))
        is_src = op.And(candidate, op.Equal(parity, int_scalar(0)))
        is_dst = op.And(candidate, op.Equal(parity, int_scalar(1)))
        best, best_dst = _best_match(metric, is_src, is_dst)
        edge_rank = _sort_rank(best, descending=True)
        removed = op.And(is_src, op.Less(edge_rank, r_row))
        if mode == "threshold":
            floor = op.Max(op.Min(_scheduled(valid_count, *_floor_schedule(r, ratio_milli, r_min_milli)), r_row),
                           int_scalar(0))
            removed = op.And(is_src, op.Or(op.Greater(best, float_scalar(threshold)), op.Less(edge_rank, floor)))

    keep = op.And(valid, op.Not(removed))
    kept_slot = _rank(keep)
    used = _row_count(keep)
    weight = size
    zero = int_scalar(0)
    if mode == "prune":
        target = op.Where(keep, kept_slot, used if fuse else zero)
        if fuse:
            used = op.Add(used, int_scalar(1))
        else:
            weight = op.Where(removed, float_scalar(0.0), size)
    else:
        target = op.Where(keep, kept_slot, op.GatherElements(kept_slot, best_dst, axis=1))
    # Padding keeps a slot of its own after the kept tokens while there is room; the rest goes to slot 0.
    pad_slot = op.Add(used, _rank(op.Not(valid)))
    pad_fits = op.And(op.Not(valid), op.Less(pad_slot, capacity))
    target = op.Where(valid, target, op.Where(pad_fits, pad_slot, zero))
    weight = op.Where(valid, weight, op.Cast(pad_fits, to=FLOAT))
    return op.Min(op.Max(target, zero), op.Sub(capacity, int_scalar(1))), weight


def _scatter_add(updates, target, capacity, hidden: bool = False):
    """``zeros(B, capacity, *rest).scatter_add(1, target, updates)`` for [B, L] or (hidden) [B, L, H] updates.

    (Intermediate values carry no static shape while tracing, so the caller says which rank it passes.)
    """
    if hidden:
        shape = op.Concat(dim(updates, 0), capacity, dim(updates, 2), axis=0)
        target = op.Expand(op.Unsqueeze(target, ints(2)), op.Shape(updates))
    else:
        shape = op.Concat(dim(updates, 0), capacity, axis=0)
    zeros = op.ConstantOfShape(shape, value=ir.tensor([0.0], dtype=FLOAT))
    return op.ScatterElements(zeros, target, updates, axis=1, reduction="add")


def _merge_scatter(x, weight, target, capacity):
    """``merge_scatter_reference``: weight-averaged slots (sum of weighted x over sum of weights)."""
    total = _scatter_add(weight, target, capacity)
    summed = _scatter_add(op.Mul(op.Cast(x, to=FLOAT), op.Unsqueeze(weight, ints(2))), target, capacity,
                          hidden=True)
    averaged = op.Div(summed, op.Unsqueeze(op.Max(total, float_scalar(1e-12)), ints(2)))
    return op.CastLike(averaged, x)


def merge_tokens(x, metric, size, source, importance, r: int, ratio_milli: int, protect: list[int], mode: str,
                 threshold: float, r_min_milli: int, fuse: bool):
    if len(metric.shape) == 4:  # keys [B, H, L, D]: averaged over heads, as ToMe does
        metric = op.ReduceMean(metric, ints(1), keepdims=0)
    metric = op.Cast(metric, to=FLOAT)
    capacity = _capacity(dim(x, 1), r, ratio_milli, mode, fuse, r_min_milli, len(protect))
    target, weight = _plan(metric, size, source, importance, r, ratio_milli, list(protect), mode, threshold,
                           r_min_milli, fuse, capacity)
    new_x = _merge_scatter(x, weight, target, capacity)
    real_size = op.Where(op.Greater(size, float_scalar(0.0)), weight, float_scalar(0.0))
    new_size = _scatter_add(real_size, target, capacity)
    new_slot = op.GatherElements(target, _slot_of(source), axis=1)
    return new_x, new_size, _encode(new_slot, _is_real(source))


TOKEN_MERGE_TRANSLATIONS = {MERGE_TOKENS: merge_tokens}
