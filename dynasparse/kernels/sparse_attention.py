"""Block-sparse attention: one plan format, the estimators and selectors that build it, and attention that
reads only the blocks it lists.

**The plan.** Queries and keys are cut into blocks of ``block_size`` tokens. For every batch row ``b``, KV
head ``h`` and query block ``r``: ``counts[b, h, r]`` (int32) KV blocks are attended, listed in ascending
order in ``indices[b, h, r, :counts]`` (int32; entries past the count are 0). One plan per KV head: the
query heads of a grouped-query group share it, so K/V are never repeated. Converts to FlexAttention's
``BlockMask`` (``to_block_mask``), which has the same shape.

**Building it** (the ``dynasparse::block_plan`` op) has two steps:

- an *estimator* scores every (query block, KV block) pair with an estimate of the log of the attention
  mass there: ``pooled`` (mean-pooled Q · mean-pooled K, SeerAttention/MInference block mode),
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

ESTIMATORS = ("pooled", "vertical_slash", "antidiagonal", "streaming")
SELECTORS = ("topk", "keep_ratio", "mass")


def num_blocks(length: int, block_size: int) -> int:
    return (length + block_size - 1) // block_size


def _pad_to_blocks(x: torch.Tensor, dim: int, block_size: int) -> torch.Tensor:
    extra = -x.shape[dim] % block_size
    if not extra:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, extra]
    return torch.nn.functional.pad(x, pad)


def last_query_positions(q_len: int, kv_len: int, block_size: int, device: torch.device) -> torch.Tensor:
    """[NQ]: key-axis position of each query block's last query (bottom-right alignment)."""
    ends = torch.arange(1, num_blocks(q_len, block_size) + 1, device=device) * block_size
    return ends.clamp(max=q_len) - 1 + (kv_len - q_len)


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


def _keys_per_block(key_valid: torch.Tensor | None, batch: int, kv_len: int, block_size: int,
                    device: torch.device) -> torch.Tensor:
    """[B, NK] float: real keys in each KV block (the last block may be short; padding does not count)."""
    ones = torch.ones(batch, kv_len, device=device) if key_valid is None else key_valid.float()
    return _pad_to_blocks(ones, 1, block_size).view(batch, -1, block_size).sum(-1)


# --- estimators: [B, Hkv, NQ, NK] fp32 log-mass estimates --------------------------------------------------

def pool_blocks(q: torch.Tensor, k: torch.Tensor, key_valid: torch.Tensor | None, block_size: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean query of each query block (over its rows and the group's heads) [B, Hkv, NQ, D], mean real key
    of each KV block [B, Hkv, NK, D], and the real keys per KV block [B, NK]."""
    batch, q_heads, q_len, dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    rows = _keys_per_block(None, 1, q_len, block_size, q.device)[0]  # real query rows per block
    q_blocks = _pad_to_blocks(q.float(), 2, block_size).view(batch, kv_heads, q_heads // kv_heads, -1,
                                                              block_size, dim)
    q_pooled = q_blocks.sum(dim=(2, 4)) / (rows[:, None] * (q_heads // kv_heads))
    weights = torch.ones(batch, kv_len, device=k.device) if key_valid is None else key_valid.float()
    k_weighted = k.float() * weights[:, None, :, None]
    k_sums = _pad_to_blocks(k_weighted, 2, block_size).view(batch, kv_heads, -1, block_size, dim).sum(3)
    counts = _keys_per_block(key_valid, batch, kv_len, block_size, k.device)
    return q_pooled, k_sums / counts.clamp(min=1)[:, None, :, None], counts


def pooled_scores(q: torch.Tensor, k: torch.Tensor, key_valid: torch.Tensor | None, block_size: int,
                  scale: float) -> torch.Tensor:
    """Pooled query · pooled key, plus the log of the block's real keys: a block of n similar keys holds
    about n times one key's mass. Blocks without real keys score -inf."""
    q_pooled, k_pooled, counts = pool_blocks(q, k, key_valid, block_size)
    scores = (q_pooled @ k_pooled.transpose(-1, -2)) * scale + counts.clamp(min=1).log()[:, None, None, :]
    return scores.masked_fill(counts[:, None, None, :] == 0, float("-inf"))


def vertical_slash_scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
                          block_size: int, scale: float, window: int) -> torch.Tensor:
    """MInference's probe: the last ``window`` queries attend to every key for real; the probabilities,
    summed over those queries and the group's heads, are read along key columns (vertical lines: keys every
    query wants) and along diagonals (slash lines: keys at a fixed distance). A block's score is the mass
    its columns carry plus the mass of the diagonals crossing it."""
    batch, q_heads, q_len, _ = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    window = min(window, q_len)
    probe_mask = None if mask is None else mask[..., -window:, :]
    probs_mask = _probe_mask(probe_mask, is_causal, window, kv_len, q.device)
    groups = q_heads // kv_heads
    scores = (q[:, :, -window:].float() @ k.float().repeat_interleave(groups, 1).transpose(-1, -2)) * scale
    if probs_mask is not None:
        scores = scores + probs_mask
    probs = scores.softmax(-1).nan_to_num(0.0)  # [B, Hq, W, Lk]
    probs = probs.view(batch, kv_heads, groups, window, kv_len).sum(2)  # [B, Hkv, W, Lk]
    vertical = _pad_to_blocks(probs.sum(2), 2, block_size).view(batch, kv_heads, -1, block_size).sum(-1)

    # slash[d]: mass at distance d = query position - key position (d >= 0: the causal side).
    positions = torch.arange(window, device=q.device) + (kv_len - window)  # key-axis position of probe rows
    distance = torch.arange(kv_len, device=q.device)
    key_index = positions[:, None] - distance[None, :]  # [W, Lk]
    on_grid = key_index >= 0
    gathered = probs.gather(-1, key_index.clamp(min=0).expand(batch, kv_heads, window, kv_len))
    slash = (gathered * on_grid).sum(2)  # [B, Hkv, Lk]
    prefix = torch.nn.functional.pad(slash.cumsum(-1), (1, 0))

    nq, nk = num_blocks(q_len, block_size), num_blocks(kv_len, block_size)
    last = last_query_positions(q_len, kv_len, block_size, q.device)
    first = (last - block_size + 1).clamp(min=kv_len - q_len)
    block_start = torch.arange(nk, device=q.device) * block_size
    block_end = (block_start + block_size).clamp(max=kv_len) - 1
    low = (first[:, None] - block_end[None, :]).clamp(0, kv_len)  # distances crossing block (r, j)
    high = (last[:, None] - block_start[None, :] + 1).clamp(0, kv_len)
    crossing = prefix[..., high.flatten()] - prefix[..., low.flatten()]
    crossing = crossing.view(batch, kv_heads, nq, nk).clamp(min=0)
    mass = (vertical[:, :, None, :] + 0.5 * crossing) / window
    return mass.clamp(min=1e-20).log()


ANTIDIAGONAL_STRIDE = 8  # tile side: 1/8 of dense QK^T; stride 16 halves that but lost quality on SmolLM2
_ANTIDIAGONAL_CHUNK = 1024  # queries per step: bounds the tile scores' memory, skips tiles past the diagonal


def antidiagonal_scores(q: torch.Tensor, k: torch.Tensor, key_valid: torch.Tensor | None, is_causal: bool,
                        block_size: int, scale: float, stride: int = ANTIDIAGONAL_STRIDE) -> torch.Tensor:
    """XAttention's estimate: cut the score matrix into ``stride`` x ``stride`` tiles and let the sum along
    each tile's antidiagonal stand for the tile. Every query row and every key column enters each row of
    tiles once, so a heavy key (a sink, a delimiter) is never averaged away as in pooling, and each query
    block is scored from its own queries, unlike a probe at the end of the prompt. Softmax over a row of
    tiles, summed into blocks and over the group's heads, estimates each block's share of the mass.
    Costs ``1/stride`` of dense QK^T, computed as one matmul of strided, flipped queries against strided keys."""
    batch, q_heads, q_len, dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    groups, stride = q_heads // kv_heads, min(stride, block_size)
    per_block = block_size // stride
    nq, nk = num_blocks(q_len, block_size), num_blocks(kv_len, block_size)
    # Row t of q_tiles holds queries t*S, ..., t*S+S-1, row u of k_tiles keys u*S+S-1, ..., u*S (flipped, and
    # scaled so a sum of S products reads as one score): their dot product is the antidiagonal sum of tile (t, u).
    q_tiles = _pad_to_blocks(q.float(), 2, block_size).reshape(batch, kv_heads, groups, nq * per_block, stride * dim)
    k_tiles = _pad_to_blocks(k.float(), 2, block_size).reshape(batch, kv_heads, nk * per_block, stride, dim)
    k_tiles = k_tiles.flip(3).reshape(batch, kv_heads, nk * per_block, stride * dim) * (scale / stride)
    keys = torch.ones(batch, kv_len, dtype=torch.bool, device=q.device) if key_valid is None else key_valid
    tile_has_keys = _pad_to_blocks(keys, 1, block_size).view(batch, 1, 1, 1, -1, stride).any(-1)  # [B,1,1,1,NKT]
    query_tiles = torch.arange(nq * per_block, device=q.device)
    tile_last_key = (query_tiles * stride + stride - 1).clamp(max=q_len - 1) + (kv_len - q_len)
    tile_rows = ((query_tiles * stride) < q_len).float()  # tiles holding real queries
    mass = torch.zeros(batch, kv_heads, nq * per_block, nk * per_block, device=q.device)
    chunk = max(_ANTIDIAGONAL_CHUNK // stride, per_block)
    for start in range(0, nq * per_block, chunk):
        stop = min(start + chunk, nq * per_block)
        width = nk * per_block if not is_causal else min(nk * per_block, int(tile_last_key[stop - 1]) // stride + 1)
        q_rows = q_tiles[:, :, :, start:stop].reshape(batch, kv_heads, groups * (stop - start), stride * dim)
        scores = (q_rows @ k_tiles[:, :, :width].transpose(-1, -2)).view(batch, kv_heads, groups, stop - start, width)
        hidden = ~tile_has_keys[..., :width]
        if is_causal:
            hidden = hidden | (torch.arange(width, device=q.device) * stride > tile_last_key[start:stop, None])
        probs = scores.masked_fill_(hidden, float("-inf")).softmax(-1).nan_to_num_(0.0)
        mass[:, :, start:stop, :width] = probs.sum(2) * tile_rows[start:stop, None]
    real_tiles = tile_rows.view(nq, per_block).sum(-1)  # real query tiles per block
    mass = mass.view(batch, kv_heads, nq, per_block, nk, per_block).sum((3, 5))
    return (mass / (groups * real_tiles[:, None])).clamp(min=1e-20).log()


def _probe_mask(mask: torch.Tensor | None, is_causal: bool, window: int, kv_len: int,
                device: torch.device) -> torch.Tensor | None:
    """Additive fp32 mask for the probe rows (the last ``window`` queries)."""
    additive = None
    if mask is not None:
        additive = (torch.zeros(mask.shape, device=device).masked_fill(~mask, float("-inf"))
                    if mask.dtype == torch.bool else mask.float())
    if is_causal:
        positions = torch.arange(window, device=device)[:, None] + (kv_len - window)
        causal = torch.zeros(window, kv_len, device=device).masked_fill(
            torch.arange(kv_len, device=device)[None, :] > positions, float("-inf"))
        additive = causal if additive is None else additive + causal
    return additive


def streaming_scores(q_len: int, kv_len: int, block_size: int, device: torch.device) -> torch.Tensor:
    """[NQ, NK]: no content, only distance: the nearer a block to the row's diagonal, the higher. With the
    forced sinks this is StreamingLLM's A-shape, its window as wide as the selector's amount."""
    diagonal = last_query_positions(q_len, kv_len, block_size, device) // block_size
    return -(diagonal[:, None] - torch.arange(num_blocks(kv_len, block_size), device=device)).abs().float()


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
    has_keys = _keys_per_block(key_valid, batch, kv_len, block_size, q.device) > 0  # [B, NK]
    valid = valid[None, None] & has_keys[:, None, None, :]
    plan_shape = (batch, k.shape[1], *valid.shape[2:])
    if kv_len < min_seq_len:
        return select_blocks(torch.zeros(plan_shape, device=q.device), valid, forced, "keep_ratio", 1.0)
    if estimator == "pooled":
        scores = pooled_scores(q, k, key_valid, block_size, scale)
    elif estimator == "vertical_slash":
        scores = vertical_slash_scores(q, k, mask, is_causal, block_size, scale, window)
    elif estimator == "antidiagonal":
        scores = antidiagonal_scores(q, k, key_valid, is_causal, block_size, scale)
    elif estimator == "streaming":
        scores = streaming_scores(q.shape[2], kv_len, block_size, q.device).expand(plan_shape)
    else:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {ESTIMATORS}")
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
    q_blocks = (_pad_to_blocks(q, 2, bs).to(compute) * scale).view(batch, kv_heads, groups, nq, bs, dim)
    k_flat = _pad_to_blocks(k, 2, bs).to(compute).reshape(batch * kv_heads * nk, bs, dim)
    v_flat = _pad_to_blocks(v, 2, bs).to(compute).reshape(batch * kv_heads * nk, bs, dim_v)
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
    mask = _pad_to_blocks(mask, 2, block_size)
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
