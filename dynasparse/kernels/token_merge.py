"""Token merging: the torch reference of every step, and the dispatch to Triton on CUDA.

State carried between merges (static shapes, no host syncs):
  ``size``   [B, L]  float: how many input tokens each slot stands for; 0 marks an empty/padding slot.
  ``source`` [B, L0] int64: for each original position, the slot that now holds it (for unmerge),
             stored as ``-(slot + 1)`` for padding, so which original tokens were real is never lost.

One merge step, for each row independently:
  1. roles: valid, unprotected slots alternate src / dst by their rank among such slots (so left and
     right padding give the same roles as the unpadded row);
  2. matching: each src finds its most similar dst (cosine of the metric) — ``best_match``;
  3. selection: the ``r_row`` src with the highest similarity merge (bipartite), or those above a
     threshold (at least the floor of the schedule, at most every src), or the ``r_row`` least important tokens are
     dropped / fused into one (prune); ``r_row`` is computed from the row's own valid count;
  4. placement: kept slots keep their order (protected tokens stay first), merged src go to their
     dst's slot, padding is dropped; everything is written with size-weighted sums — ``merge_scatter``
     — so ONNX needs only ScatterElements(add), never scatter_reduce(mean).
"""
from __future__ import annotations

import contextlib

import torch

from dynasparse.kernels.attention import softmax_scale

NEG = float("-inf")

# Set by ``recording_edge_scores``: each bipartite step appends the similarity of every row's weakest
# merged edge (calibration of threshold mode); None otherwise.
_EDGE_SCORES: list[torch.Tensor] | None = None


def scheduled_merges(valid_count, r: int, ratio_milli: int):
    """Merges the schedule asks of a row of ``valid_count`` tokens.

    ``ratio_milli < 0``: ``r`` per row. Otherwise a share (in 1/1000) of the tokens beyond the first ``r``:
    rows of at most ``r`` tokens (short queries) are left whole. May be negative for short rows; callers
    clamp at 0 per row.
    """
    return r if ratio_milli < 0 else ((valid_count - r) * ratio_milli) // 1000


def merged_capacity(length, r: int, ratio_milli: int, mode: str, fuse: bool, r_min_milli: int, protected: int):
    """Slots after one step for ``length`` input slots: what a full row keeps (fewer real tokens keep fewer).

    A share: ``ceil(L·(1 - f) + r·f)``, written so ``length`` appears once (capacities of successive merges
    nest, and a symbolic length used twice per step would grow the shape expressions exponentially; so a
    batch shorter than ``r`` tokens in ratio mode gets a few empty slots rather than a clamp). A constant
    ``r``: ``max(L - r, what a row keeps when it merges all it can)`` (half of the unprotected tokens are
    sources, all of them when pruning): short rows merge fewer, as in ToMe, rather than fail. Under export
    that max stays symbolic (one graph for every length; slow to trace over many blocks); elsewhere it is a
    branch that guards on the length, so compiled graphs recompile for short batches instead.
    Threshold mode is only sure to merge ``r_min_milli``/1000 of its schedule, so its capacity keeps room
    for rows that merge no more than that.
    """
    if mode == "threshold":
        r, ratio_milli = (r * r_min_milli // 1000, -1) if ratio_milli < 0 else (r, ratio_milli * r_min_milli // 1000)
    if ratio_milli < 0:
        least = protected if mode == "prune" else (length + protected) // 2
        if torch.compiler.is_exporting():
            kept = torch.sym_max(length - r, least)
        else:
            kept = length - r if length - r >= least else least
    else:
        kept = (length * (1000 - ratio_milli) + r * ratio_milli + 999) // 1000
    return kept + (1 if mode == "prune" and fuse else 0)


def most_merges(candidates, mode: str):
    """The most tokens a row with ``candidates`` unprotected tokens can give up in one step: all of them
    when pruning, else its sources, half of them (rounded up)."""
    return candidates if mode == "prune" else (candidates + 1) // 2


@contextlib.contextmanager
def recording_edge_scores():
    """Collect, per bipartite merge step in call order, the similarity of each row's last merged edge."""
    global _EDGE_SCORES
    _EDGE_SCORES = []
    try:
        yield _EDGE_SCORES
    finally:
        _EDGE_SCORES = None


def best_match_reference(metric: torch.Tensor, is_src: torch.Tensor, is_dst: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """For every slot: cosine similarity to its most similar dst and that dst's index.

    Rows that are not src get score -inf (and index 0). ``metric`` is [B, L, C]. Only src × dst pairs are
    scored: each role is gathered into the front of its own buffer first (a stable sort on the role), so
    the product is about a quarter of L × L when roles alternate, as ``plan_merge`` assigns them.
    """
    batch, length = is_src.shape
    # reading the counts is free on CPU, where this reference runs (CUDA takes the Triton kernel)
    width = max(int(is_src.sum(dim=1).max()), int(is_dst.sum(dim=1).max()), 1)
    src_at = (~is_src).to(torch.int8).argsort(dim=1, stable=True)[:, :width]
    dst_at = (~is_dst).to(torch.int8).argsort(dim=1, stable=True)[:, :width]
    unit = metric.float() / metric.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    channels = unit.shape[-1]
    src_unit = unit.gather(1, src_at[..., None].expand(-1, -1, channels))
    dst_unit = unit.gather(1, dst_at[..., None].expand(-1, -1, channels))
    scores = (src_unit @ dst_unit.transpose(-1, -2)).masked_fill(~is_dst.gather(1, dst_at)[:, None, :], NEG)
    local_best, local_index = scores.max(dim=-1)
    src_ok = is_src.gather(1, src_at)
    best = torch.full((batch, length), NEG, device=metric.device).scatter_(
        1, src_at, torch.where(src_ok, local_best, torch.full_like(local_best, NEG)))
    index = torch.zeros(batch, length, dtype=torch.long, device=metric.device).scatter_(
        1, src_at, torch.where(src_ok, dst_at.gather(1, local_index), torch.zeros_like(local_index)))
    return best, index


def merge_scatter_reference(x: torch.Tensor, size: torch.Tensor, target: torch.Tensor, capacity: int
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average of the slots sent to each target slot; empty targets give 0."""
    batch, _, hidden = x.shape
    new_size = size.new_zeros(batch, capacity).scatter_add(1, target, size)
    weighted = (x.float() * size[..., None]).to(torch.float32)
    summed = weighted.new_zeros(batch, capacity, hidden).scatter_add(
        1, target[..., None].expand(-1, -1, hidden), weighted)
    return (summed / new_size.clamp_min(1e-12)[..., None]).to(x.dtype), new_size


def _rank(flags: torch.Tensor) -> torch.Tensor:
    return flags.long().cumsum(dim=1) - 1


def plan_merge(metric: torch.Tensor, size: torch.Tensor, source: torch.Tensor, importance: torch.Tensor | None,
               *, r: int, ratio_milli: int, protect: list[int], mode: str, threshold: float, r_min_milli: int,
               fuse: bool, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each slot goes and with what weight: ([B, L] target slot, [B, L] float weight).

    Real tokens weigh their size. Padding keeps a slot of its own after the kept tokens while there is
    room (weight 1, but no size: still masked as a key), so at r = 0 the layout is the identity; padding
    beyond the capacity, and tokens pruned without fusing, go to slot 0 with weight 0.
    """
    batch, length = size.shape
    valid = size > 0
    protected = torch.zeros_like(valid)
    if protect:  # ``protect`` counts real tokens: position 0 is the first real token (CLS) with any padding
        real = source >= 0
        wanted = real & torch.isin(_rank(real), torch.tensor(protect, device=source.device))
        hits = torch.zeros_like(size).scatter_add(1, torch.where(wanted, source, torch.zeros_like(source)),
                                                  wanted.to(size.dtype))  # a sum: repeated indices are safe
        protected = hits > 0
    candidate = valid & ~protected
    rank = _rank(candidate)
    valid_count, candidates = valid.sum(dim=1, keepdim=True), candidate.sum(dim=1, keepdim=True)
    most = most_merges(candidates, mode)  # r is capped per row
    r_row = torch.clamp(torch.minimum(torch.as_tensor(scheduled_merges(valid_count, r, ratio_milli)), most), min=0)

    if mode == "prune":
        score = importance.float().masked_fill(~candidate, float("inf"))
        order = score.argsort(dim=1, stable=True)
        order_rank = torch.empty_like(order).scatter_(1, order, torch.arange(length, device=order.device)
                                                      .expand(batch, -1))
        removed = candidate & (order_rank < r_row)
    else:
        is_src, is_dst = candidate & (rank % 2 == 0), candidate & (rank % 2 == 1)
        best, best_dst = best_match(metric, is_src, is_dst)
        order = best.argsort(dim=1, descending=True, stable=True)
        edge_rank = torch.empty_like(order).scatter_(1, order, torch.arange(length, device=order.device)
                                                     .expand(batch, -1))
        removed = is_src & (edge_rank < r_row)
        if _EDGE_SCORES is not None and mode == "bipartite":
            weakest = best.gather(1, order).gather(1, (r_row - 1).clamp(min=0))[:, 0]
            _EDGE_SCORES.append(weakest[(r_row[:, 0] > 0) & torch.isfinite(weakest)])
        if mode == "threshold":  # every src above the threshold merges, and at least the floor does
            floor_r, floor_ratio = ((r * r_min_milli // 1000, -1) if ratio_milli < 0
                                    else (r, ratio_milli * r_min_milli // 1000))
            floor = torch.clamp(torch.minimum(torch.as_tensor(scheduled_merges(valid_count, floor_r, floor_ratio)),
                                              r_row), min=0)
            removed = is_src & ((best > threshold) | (edge_rank < floor))

    keep = valid & ~removed
    kept_slot = _rank(keep)
    used = keep.sum(dim=1, keepdim=True)
    weight = size
    if mode == "prune":
        target = torch.where(keep, kept_slot, used.expand(-1, length) if fuse else torch.zeros_like(kept_slot))
        used = used + int(fuse)
        if not fuse:
            weight = torch.where(removed, torch.zeros_like(size), size)
    else:
        target = torch.where(keep, kept_slot, kept_slot.gather(1, best_dst))
    pad_slot = used + _rank(~valid)
    pad_fits = ~valid & (pad_slot < capacity)
    target = torch.where(valid, target, torch.where(pad_fits, pad_slot, torch.zeros_like(pad_slot)))
    weight = torch.where(valid, weight, pad_fits.to(size.dtype))
    return target.clamp_(min=0, max=capacity - 1), weight


def merge_tokens_reference(x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor, source: torch.Tensor,
                           importance: torch.Tensor | None, *, r: int, ratio_milli: int, protect: list[int],
                           mode: str, threshold: float, r_min_milli: int, fuse: bool
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One merge step; see the module docstring. Returns (x, size, source) in the merged layout."""
    if metric.dim() == 4:  # keys [B, H, L, D]: average over heads, as ToMe does
        metric = metric.mean(dim=1)
    capacity = merged_capacity(x.shape[1], r, ratio_milli, mode, fuse, r_min_milli, len(protect))
    target, weight = plan_merge(metric, size, source, importance, r=r, ratio_milli=ratio_milli, protect=protect,
                                mode=mode, threshold=threshold, r_min_milli=r_min_milli, fuse=fuse,
                                capacity=capacity)
    new_x, _ = merge_scatter(x, weight, target, capacity)
    real_size = torch.where(size > 0, weight, torch.zeros_like(weight))
    new_size = real_size.new_zeros(size.shape[0], capacity).scatter_add(1, target, real_size)
    new_slot = target.gather(1, slot_of(source))
    return new_x, new_size, torch.where(source >= 0, new_slot, -new_slot - 1)


def slot_of(source: torch.Tensor) -> torch.Tensor:
    """Decode ``source`` (padding is stored as ``-(slot + 1)``) to plain slot indices."""
    return torch.where(source >= 0, source, -source - 1)


def unmerge_reference(x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """[B, L', H] → [B, L0, H]: every original position reads the slot that holds it."""
    return x.gather(1, slot_of(source)[..., None].expand(-1, -1, x.shape[-1]))


def attention_bias(size: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, 1, L] additive key bias: log(size) (proportional attention), -max for empty slots."""
    bias = torch.where(size > 0, size.clamp_min(1e-12).log(), torch.full_like(size, torch.finfo(dtype).min))
    return bias[:, None, None, :].to(dtype)


def best_match(metric, is_src, is_dst):
    if metric.is_cuda:
        from dynasparse.kernels.token_merge_triton import best_match_triton
        return best_match_triton(metric, is_src, is_dst)
    return best_match_reference(metric, is_src, is_dst)


def merge_scatter(x, size, target, capacity):
    if x.is_cuda:
        from dynasparse.kernels.token_merge_triton import merge_scatter_triton
        return merge_scatter_triton(x, size, target, capacity)
    return merge_scatter_reference(x, size, target, capacity)


def cls_importance_reference(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float | None,
                             cls_index: int) -> torch.Tensor:
    """softmax(q_cls · Kᵀ · scale + bias) averaged over heads: [B, L] float32."""
    groups = q.shape[1] // k.shape[1]
    keys = k.float().repeat_interleave(groups, dim=1)
    query = q[:, :, cls_index: cls_index + 1].float()
    scale = softmax_scale(scale, q.shape[-1])
    logits = (query @ keys.transpose(-2, -1)) * scale
    if bias is not None:
        logits = logits + bias.float() if bias.dtype != torch.bool else logits.masked_fill(~bias, NEG)
    return logits.softmax(dim=-1).mean(dim=1)[:, 0]
