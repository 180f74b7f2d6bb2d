"""Block-sparse attention: one plan format, the estimators and selectors that build it, and attention that
reads only the blocks it lists.

**The plan.** Queries and keys are cut into blocks of ``block_size`` tokens. For every batch row ``b``, KV
head ``h`` and query block ``r``: ``counts[b, h, r]`` (int32) KV blocks are attended, listed in ascending
order in ``indices[b, h, r, :counts]`` (int32; entries past the count are 0). One plan per KV head: the
query heads of a grouped-query group share it, so K/V are never repeated. Converts to FlexAttention's
``BlockMask`` (``to_block_mask``), which has the same shape.

**Building it** (the ``dynasparse::block_plan`` op) has two steps:

- an *estimator* (one module each in ``dynasparse.kernels.estimators``, looked up by name in ``ESTIMATORS``)
  scores every (query block, KV block) pair with an estimate of the log of the attention mass there:
  ``pooled`` (mean-pooled Q · mean-pooled K, SeerAttention/MInference block mode),
  ``vertical_slash`` (the last queries' real attention summed into key columns and diagonals, MInference),
  ``antidiagonal`` (sums along the antidiagonals of small tiles of the real scores, XAttention), or
  ``streaming`` (no content: the blocks nearest the diagonal, StreamingLLM's A-shape);
- a *selector* keeps blocks per row: ``topk`` (a fixed number), ``keep_ratio`` (a share of the row's
  causally valid blocks) or ``mass`` (the fewest blocks whose estimated mass reaches a fraction, FlexPrefill).
  Sink blocks and the local blocks ending at the diagonal are always kept and count toward the amount.

Causality is bottom-right aligned as in ``dynasparse.kernels.attention``: a query block sees the KV blocks
up to the one holding its last query's position. Keys that the mask hides from every query (padding) make no
block valid on their own; inside kept blocks the exact mask still applies, so a plan that keeps every valid
block is dense attention.
"""
from __future__ import annotations


import torch

from dynasparse.kernels.attention import attention_reference, causal_mask, key_validity, softmax_scale
from dynasparse.kernels.blocks import keys_per_block, last_query_positions, num_blocks, pad_to_blocks
from dynasparse.kernels.estimators import ESTIMATORS, EstimatorInputs

SELECTORS = ("topk", "keep_ratio", "mass")


def block_layout(q_len: int, kv_len: int, block_size: int, is_causal: bool, sink_blocks: int,
                 local_blocks: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid, forced): [NQ, NK] bool. Valid: causally reachable. Forced: sinks and the local blocks that
    end at the block holding the row's last query."""
    nq, nk = num_blocks(q_len, block_size), num_blocks(kv_len, block_size)
    block_start = torch.arange(nk, device=device) * block_size
    last = last_query_positions(q_len, kv_len, block_size, device)
    valid = block_start[None, :] <= last[:, None] if is_causal else torch.ones(nq, nk, dtype=torch.bool,
                                                                               device=device)
    diagonal = (last // block_size).clamp(min=0, max=nk - 1)
    ids = torch.arange(nk, device=device)
    local = (ids[None, :] <= diagonal[:, None]) & (ids[None, :] > diagonal[:, None] - local_blocks)
    forced = (ids[None, :] < sink_blocks) | local
    return valid, forced & valid


# --- selectors ---------------------------------------------------------------------------------------------

def select_blocks(scores: torch.Tensor, valid: torch.Tensor, forced: torch.Tensor, selector: str,
                  amount: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the forced blocks, then the best-scored ones up to the selector's amount; returns the plan.

    ``scores`` [B, Hkv, NQ, NK] log-mass estimates (-inf: never chosen unless forced); ``valid`` and
    ``forced`` broadcast to it. ``amount``: blocks per row (topk), a share of the row's valid blocks
    (keep_ratio) or a share of its estimated mass (mass). Ties go to the lower block id.
    """
    nk = scores.shape[-1]
    forced = forced & valid
    selectable = valid & (forced | (scores > float("-inf")))
    ranked = torch.where(forced, float("inf"), torch.where(selectable, scores, float("-inf")))
    order = ranked.argsort(dim=-1, descending=True, stable=True)
    n_valid = valid.sum(-1).expand(scores.shape[:-1])
    if selector == "topk":
        wanted = torch.full_like(n_valid, int(amount))
    elif selector == "keep_ratio":
        wanted = torch.ceil(n_valid * amount - 1e-6).long()
    elif selector == "mass":
        probs = torch.where(selectable, scores, float("-inf")).softmax(-1).nan_to_num(0.0)
        before = probs.gather(-1, order).cumsum(-1) - probs.gather(-1, order)  # mass of the better blocks
        wanted = (before < amount - 1e-6).sum(-1)
    else:
        raise ValueError(f"unknown selector {selector!r}; expected one of {SELECTORS}")
    counts = torch.minimum(torch.maximum(wanted, forced.sum(-1)), selectable.sum(-1))
    rank = torch.arange(nk, device=scores.device)
    chosen = torch.where(rank < counts[..., None], order, nk).sort(dim=-1).values
    indices = torch.where(rank < counts[..., None], chosen, 0)
    return counts.to(torch.int32), indices.to(torch.int32)


def build_plan(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
               scale: float | None, block_size: int, estimator: str, selector: str, amount: float,
               sink_blocks: int, local_blocks: int, min_seq_len: int, window: int,
               first_block: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``dynasparse::block_plan`` op: estimate, then select. Keys shorter than ``min_seq_len`` keep
    every valid block (dense). ``first_block`` [B]: where each row's keys begin, for rows laid out
    right-aligned; the sink blocks count from there (None: from block 0)."""
    batch, kv_len = q.shape[0], k.shape[2]
    scale = softmax_scale(scale, q.shape[-1])
    valid, forced = block_layout(q.shape[2], kv_len, block_size, is_causal, sink_blocks, local_blocks, q.device)
    if first_block is not None:
        _, local = block_layout(q.shape[2], kv_len, block_size, is_causal, 0, local_blocks, q.device)
        offset = torch.arange(valid.shape[1], device=q.device) - first_block[:, None]  # [B, NK]
        forced = local | ((offset >= 0) & (offset < sink_blocks))[:, None, None, :]
    key_valid = None if mask is None else key_validity(mask, batch, kv_len, q.device)
    has_keys = keys_per_block(key_valid, batch, kv_len, block_size, q.device) > 0  # [B, NK]
    valid = valid[None, None] & has_keys[:, None, None, :]
    plan_shape = (batch, k.shape[1], *valid.shape[2:])
    if kv_len < min_seq_len:
        return select_blocks(torch.zeros(plan_shape, device=q.device), valid, forced, "keep_ratio", 1.0)
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {tuple(ESTIMATORS)}")
    inputs = EstimatorInputs(q, k, mask, key_valid, is_causal, block_size, scale, window)
    scores = ESTIMATORS[estimator](inputs).expand(plan_shape)
    return select_blocks(scores, valid, forced, selector, amount)


# --- plan views --------------------------------------------------------------------------------------------

def plan_block_mask(counts: torch.Tensor, indices: torch.Tensor, kv_blocks: int) -> torch.Tensor:
    """[B, Hkv, NQ, NK] bool: the blocks the plan lists."""
    listed = torch.arange(indices.shape[-1], device=indices.device) < counts[..., None]
    out = torch.zeros(*counts.shape, kv_blocks + 1, dtype=torch.bool, device=counts.device)
    out.scatter_(-1, torch.where(listed, indices.long(), kv_blocks), True)
    return out[..., :kv_blocks]


def plan_token_mask(counts: torch.Tensor, indices: torch.Tensor, block_size: int, q_len: int, kv_len: int,
                    q_heads: int) -> torch.Tensor:
    """[B, Hq, Lq, Lk] bool: the plan at token level, repeated over each group's query heads."""
    blocks = plan_block_mask(counts, indices, num_blocks(kv_len, block_size))
    blocks = blocks.repeat_interleave(q_heads // counts.shape[1], dim=1)
    tokens = blocks.repeat_interleave(block_size, dim=2).repeat_interleave(block_size, dim=3)
    return tokens[:, :, :q_len, :kv_len]


def sparse_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                               is_causal: bool, scale: float | None, counts: torch.Tensor,
                               indices: torch.Tensor, block_size: int) -> torch.Tensor:
    """Brute force: dense fp32 attention under (mask ∧ causal ∧ plan). [B, Hq, Lq, Dv]; the oracle."""
    keep = plan_token_mask(counts, indices, block_size, q.shape[2], k.shape[2], q.shape[1])
    if is_causal:
        keep = keep & causal_mask(q.shape[2], k.shape[2], q.device)
    if mask is None or mask.dtype == torch.bool:
        return attention_reference(q, k, v, keep if mask is None else keep & mask, False, scale)
    out = attention_reference(q, k, v, mask.float().masked_fill(~keep, float("-inf")), False, scale)
    return out.masked_fill(~keep.any(-1, keepdim=True), 0.0)  # plan and causality leave nothing: 0


def to_block_mask(counts: torch.Tensor, indices: torch.Tensor, block_size: int, q_len: int, kv_len: int,
                  q_heads: int, is_causal: bool):
    """The plan as a FlexAttention ``BlockMask``: the same block lists (query heads of a group repeat their
    KV head's), and a ``mask_mod`` that reads the plan too, so eager (unfused) FlexAttention agrees."""
    from torch.nn.attention.flex_attention import BlockMask

    groups = q_heads // counts.shape[1]
    listed = plan_block_mask(counts, indices, num_blocks(kv_len, block_size))
    offset = kv_len - q_len

    def in_plan(b, h, q_idx, kv_idx):
        allowed = listed[b, h // groups, q_idx // block_size, kv_idx // block_size]
        return allowed & (q_idx + offset >= kv_idx) if is_causal else allowed

    return BlockMask.from_kv_blocks(counts.repeat_interleave(groups, 1), indices.repeat_interleave(groups, 1),
                                    BLOCK_SIZE=block_size, mask_mod=in_plan, seq_lengths=(q_len, kv_len))


# --- the CPU path: gather the listed blocks, dense math on them ----------------------------------------------

def keeps_every_block(counts: torch.Tensor, q_len: int, kv_len: int, block_size: int, is_causal: bool) -> bool:
    """True when every row lists every block it can reach: the plan is dense attention, which SDPA's fused
    kernel computes faster than any gather (one host sync)."""
    reachable = torch.full((num_blocks(q_len, block_size),), num_blocks(kv_len, block_size), device=counts.device)
    if is_causal:
        reachable = torch.minimum(reachable, last_query_positions(q_len, kv_len, block_size, counts.device)
                                  // block_size + 1)
    return bool((counts >= reachable).all())


_CHUNK_ELEMENTS = 1 << 21  # score elements per chunk of query blocks: 8 MB of fp32 stays in cache


def sparse_attention_gather(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                            is_causal: bool, scale: float | None, counts: torch.Tensor, indices: torch.Tensor,
                            block_size: int) -> torch.Tensor:
    """Attention over the listed blocks only, as batched dense math, so the saving shows on CPU too.

    For a chunk of query blocks, each row's KV blocks are gathered (padded to the chunk's widest row) with
    its two highest reachable blocks first: only those can hold keys after some query of the block, so the
    causal mask touches 2 blocks per row instead of all. Padding slots, blocks wholly in the future and keys
    past the end get -inf through the bias of one fused ``baddbmm``. Returns sequence-major [B, Lq, Hq, Dv], like ``dynasparse::attention``.
    """
    batch, q_heads, q_len, dim = q.shape
    kv_heads, kv_len, dim_v = k.shape[1], k.shape[2], v.shape[-1]
    groups, bs = q_heads // kv_heads, block_size
    nq, nk = num_blocks(q_len, bs), num_blocks(kv_len, bs)
    scale = softmax_scale(scale, dim)
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    q_blocks = (pad_to_blocks(q, 2, bs).to(compute) * scale).view(batch, kv_heads, groups, nq, bs, dim)
    k_flat = pad_to_blocks(k, 2, bs).to(compute).reshape(batch * kv_heads * nk, bs, dim)
    v_flat = pad_to_blocks(v, 2, bs).to(compute).reshape(batch * kv_heads * nk, bs, dim_v)
    user_mask = _mask_rows(mask, batch, q_heads, kv_heads, q_len, kv_len, bs)
    head_base = (torch.arange(batch * kv_heads, device=q.device) * nk).view(batch, kv_heads, 1, 1)
    within = torch.arange(bs, device=q.device)
    out = q.new_empty(batch, nq * bs, kv_heads, groups, dim_v)
    last = last_query_positions(q_len, kv_len, bs, q.device)
    row_max = counts.amax(dim=(0, 1)).tolist()  # one host sync: the widest row of every query block

    for start, stop, width in _chunks(row_max, groups * bs * bs * batch * kv_heads):
        n = stop - start
        rows = slice(start * bs, stop * bs)
        if width == 0:
            out[:, rows] = 0
            continue
        count = counts[:, :, start:stop, None].long()
        slot = torch.arange(width, device=q.device)
        listed = slot < count
        ids = indices[:, :, start:stop, :width].long()
        if is_causal:  # blocks wholly after the row's last query are masked by the bias below
            present = listed & (ids * bs <= last[start:stop, None])
            reachable = present.sum(-1, keepdim=True)
        else:
            reachable = count
        # the two highest reachable blocks first: slot s reads listed entry (s + reachable - 2) mod count
        order = (slot + reachable - reachable.clamp(max=2)) % count.clamp(min=1)
        ids = ids.gather(-1, torch.where(listed, order, 0))  # [B, Hkv, n, W]
        flat_ids = (ids + head_base).flatten()
        keys = k_flat.index_select(0, flat_ids).view(-1, width * bs, dim)
        values = v_flat.index_select(0, flat_ids).view(-1, width * bs, dim_v)
        queries = q_blocks[:, :, :, start:stop].transpose(2, 3).reshape(-1, groups * bs, dim)

        key_pos = (ids[..., None] * bs + within).flatten(-2)  # [B, Hkv, n, W*bs]
        live = listed & (ids * bs <= last[start:stop, None]) if is_causal else listed
        usable = live.repeat_interleave(bs, dim=-1) & (key_pos < kv_len)
        bias = torch.zeros(usable.shape, dtype=compute, device=q.device).masked_fill_(~usable, float("-inf"))
        scores = torch.baddbmm(bias.view(-1, 1, width * bs), queries, keys.transpose(1, 2))
        scores = scores.view(batch, kv_heads, n, groups, bs, width * bs)
        if is_causal:
            near = min(2, width) * bs  # the two highest blocks, first in the row
            q_pos = (torch.arange(start * bs, stop * bs, device=q.device) + kv_len - q_len).view(n, 1, bs, 1)
            future = key_pos[:, :, :, None, None, :near] > q_pos
            scores[..., :near].masked_fill_(future, float("-inf"))
        if user_mask is not None:
            mask_rows = user_mask[:, :, :, rows].unflatten(3, (n, bs)).transpose(2, 3)
            picked = mask_rows.gather(-1, key_pos.clamp(max=kv_len - 1)[:, :, :, None, None, :].expand(
                *mask_rows.shape[:-1], width * bs))
            if picked.dtype == torch.bool:
                scores.masked_fill_(~picked, float("-inf"))
            else:
                scores += picked.to(compute)
        probs = scores.view(-1, groups * bs, width * bs).softmax(-1).nan_to_num_(0.0)  # no key allowed: 0
        block_out = torch.bmm(probs, values).view(batch, kv_heads, n, groups, bs, dim_v)
        out[:, rows] = block_out.permute(0, 2, 4, 1, 3, 5).reshape(batch, n * bs, kv_heads, groups, dim_v)
    if nq * bs != q_len:
        out = out[:, :q_len].contiguous()
    return out.view(batch, q_len, q_heads, dim_v)


def _mask_rows(mask: torch.Tensor | None, batch: int, q_heads: int, kv_heads: int, q_len: int, kv_len: int,
               block_size: int) -> torch.Tensor | None:
    """The user mask as [B, Hkv, G or 1, Lq_padded, Lk] (a view where it broadcasts)."""
    if mask is None:
        return None
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    mask = mask.expand(batch, mask.shape[1], q_len, kv_len)
    mask = pad_to_blocks(mask, 2, block_size)
    if mask.shape[1] == 1:
        return mask[:, :, None].expand(batch, kv_heads, 1, *mask.shape[2:])
    return mask.view(batch, kv_heads, q_heads // kv_heads, *mask.shape[2:])


def _chunks(row_widths: list[int], elements_per_block_pair: int):
    """Consecutive query blocks grouped so each chunk's scores stay under ``_CHUNK_ELEMENTS`` and no row is
    padded by more than a block or 10%; yields (start, stop, widest row in the chunk)."""
    start, low, high = 0, None, 0
    for row, row_width in enumerate(row_widths):
        new_low = row_width if low is None else min(low, row_width)
        new_high = max(high, row_width)
        too_big = (row - start + 1) * new_high * elements_per_block_pair > _CHUNK_ELEMENTS
        too_ragged = new_high - new_low > max(1, new_high // 10)
        if row > start and (too_big or too_ragged):
            yield start, row, high
            start, new_low, new_high = row, row_width, row_width
        low, high = new_low, new_high
    if row_widths:
        yield start, len(row_widths), high
