"""Triton kernels for block-sparse attention, each checked against ``dynasparse.kernels.sparse_attention``.

``block_sparse_attention_triton`` (prefill): one program per (query block, batch × query head) walks only
the KV blocks its plan row lists, flash-attention style (online softmax in fp32, nothing L×L in memory).
``block_sparse_decode_triton`` (decode, one query block): one program per (batch, KV head) stacks the
group's query heads as tile rows, so every listed K/V block is read once for the whole group.
``pooled_select_triton``: scores one plan row (pooled query · pooled keys) and selects its blocks in the
same program with an in-register sort, so building the plan is one launch after the pooling.

The wrappers allocate on the input's device and never check ``is_cuda``: ``TRITON_INTERPRET=1`` runs them
on CPU tensors. Only long-stable ``tl`` APIs are used (load/store/dot/sort/cumsum/where), triton 3.6+.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from dynasparse.kernels.attention import key_validity, softmax_scale
from dynasparse.kernels.blocks import num_blocks
from dynasparse.kernels.estimators.pooled import pool_blocks
from dynasparse.kernels.sparse_attention import SELECTORS


def _mask_strides(mask: torch.Tensor | None, shape: tuple[int, int, int, int]) -> tuple[torch.Tensor | None, ...]:
    """The mask broadcast to [B, Hq, Lq, Lk] as (tensor, 4 strides); broadcast dims get stride 0."""
    if mask is None:
        return None, 0, 0, 0, 0
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    mask = mask.expand(shape)
    return (mask, *mask.stride())


@triton.jit
def _attend_block(acc, m_i, l_i, q, k_ptrs, v_ptrs, key_pos, q_pos, row_ok, mask_ptrs,
                  kv_len, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
                  PRECISION: tl.constexpr):
    """One KV block into the running (acc, max, sum) of an online softmax; q is pre-scaled by log2(e)."""
    key_ok = key_pos < kv_len
    k = tl.load(k_ptrs, mask=key_ok[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    allowed = row_ok[:, None] & key_ok[None, :]
    if IS_CAUSAL:
        allowed = allowed & (key_pos[None, :] <= q_pos[:, None])
    if HAS_MASK:
        m = tl.load(mask_ptrs, mask=allowed, other=0)
        if MASK_BOOL:
            allowed = allowed & (m != 0)
        else:
            s += m.to(tl.float32) * 1.4426950408889634
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet stay at zero
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    v = tl.load(v_ptrs, mask=key_ok[:, None], other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _normalized(acc, l_i):
    """The online softmax's output: acc / sum, and 0 for rows that had no allowed key (as SDPA)."""
    return tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)


@triton.jit
def _block_sparse_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, mask_ptr, counts_ptr, indices_ptr,
    q_len, kv_len, qk_scale, groups, kv_heads, q_heads,
    s_qb, s_qh, s_ql, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl, s_ob, s_ol, s_oh,
    s_mb, s_mh, s_mq, s_mk, s_cb, s_ch, s_cq, s_ib, s_ih, s_iq,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    PRECISION: tl.constexpr,
):
    q_block = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // q_heads).to(tl.int64)
    h = bh % q_heads
    kv_h = h // groups
    rows = q_block * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < q_len
    q_pos = rows + (kv_len - q_len)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(q_ptr + b * s_qb + h * s_qh + rows[:, None] * s_ql + d[None, :],
                mask=row_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    q = (q.to(tl.float32) * qk_scale).to(q.dtype)
    acc = tl.zeros([BLOCK, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    count = tl.load(counts_ptr + b * s_cb + kv_h * s_ch + q_block * s_cq)
    row_indices = indices_ptr + b * s_ib + kv_h * s_ih + q_block * s_iq
    for i in range(count):
        key_pos = tl.load(row_indices + i) * BLOCK + tl.arange(0, BLOCK)
        k_ptrs = k_ptr + b * s_kb + kv_h * s_kh + key_pos[:, None] * s_kl + d[None, :]
        v_ptrs = v_ptr + b * s_vb + kv_h * s_vh + key_pos[:, None] * s_vl + dv[None, :]
        mask_ptrs = mask_ptr + b * s_mb + h * s_mh + rows[:, None] * s_mq + key_pos[None, :] * s_mk
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_ptrs, v_ptrs, key_pos, q_pos, row_ok, mask_ptrs,
                                      kv_len, IS_CAUSAL, HAS_MASK, MASK_BOOL, PRECISION)
    out = _normalized(acc, l_i)
    tl.store(o_ptr + b * s_ob + rows[:, None] * s_ol + h * s_oh + dv[None, :], out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (dv[None, :] < HEAD_DIM_V))


def _attention_launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      is_causal: bool, scale: float | None, block_size: int) -> tuple[torch.Tensor, list, dict]:
    """What both attention kernels take: the output, the leading tensor/scalar/stride arguments
    (q, k, v, out, mask, then the strides of q, k, v, out and the mask) and the tile constexprs."""
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size={block_size}: the Triton kernels need a power of two >= 16")
    if q.shape[-1] != k.shape[-1] or q.shape[1] % k.shape[1]:
        raise ValueError("q and k need the same head dim and query heads a multiple of kv heads")
    batch, q_heads, q_len, dim = q.shape
    kv_len, dim_v = k.shape[2], v.shape[-1]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = q.new_empty(batch, q_len, q_heads, dim_v)
    scale = softmax_scale(scale, dim)
    mask_t, *mask_strides = _mask_strides(mask, (batch, q_heads, q_len, kv_len))
    tensors = [q, k, v, out, mask_t if mask_t is not None else q]
    strides = [*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *mask_strides]
    constexprs = dict(BLOCK=block_size, BLOCK_D=max(16, triton.next_power_of_2(dim)),
                      BLOCK_DV=max(16, triton.next_power_of_2(dim_v)), HEAD_DIM=dim, HEAD_DIM_V=dim_v,
                      IS_CAUSAL=is_causal, HAS_MASK=mask_t is not None,
                      MASK_BOOL=mask_t is not None and mask_t.dtype == torch.bool,
                      PRECISION="ieee" if q.dtype == torch.float32 else "tf32")  # fp32 stays exact
    return out, [tensors, scale * 1.4426950408889634, strides], constexprs


def block_sparse_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                                  is_causal: bool, scale: float | None, counts: torch.Tensor,
                                  indices: torch.Tensor, block_size: int) -> torch.Tensor:
    """Prefill: [B, Hq, Lq, D] queries against the plan's KV blocks → sequence-major [B, Lq, Hq, Dv]."""
    out, (tensors, qk_scale, strides), constexprs = _attention_launch(q, k, v, mask, is_causal, scale, block_size)
    batch, q_heads, q_len = q.shape[:3]
    kv_heads, kv_len = k.shape[1], k.shape[2]
    grid = (num_blocks(q_len, block_size), batch * q_heads)
    _block_sparse_fwd_kernel[grid](
        *tensors, counts, indices, q_len, kv_len, qk_scale, q_heads // kv_heads, kv_heads, q_heads,
        *strides, *counts.stride(), *indices.stride()[:3], **constexprs)
    return out


@triton.jit
def _block_sparse_decode_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, mask_ptr, counts_ptr, indices_ptr,
    q_len, kv_len, qk_scale, groups, kv_heads,
    s_qb, s_qh, s_ql, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl, s_ob, s_ol, s_oh,
    s_mb, s_mh, s_mq, s_mk, s_cb, s_ch, s_ib, s_ih,
    BLOCK: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    MASK_BOOL: tl.constexpr, PRECISION: tl.constexpr,
):
    bh = tl.program_id(0)
    b = (bh // kv_heads).to(tl.int64)
    kv_h = bh % kv_heads
    r = tl.arange(0, ROWS)  # tile row = (query head of the group, query position)
    head = kv_h * groups + r // q_len
    pos = r % q_len
    row_ok = r < groups * q_len
    q_pos = pos + (kv_len - q_len)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(q_ptr + b * s_qb + head[:, None] * s_qh + pos[:, None] * s_ql + d[None, :],
                mask=row_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    q = (q.to(tl.float32) * qk_scale).to(q.dtype)
    acc = tl.zeros([ROWS, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    count = tl.load(counts_ptr + b * s_cb + kv_h * s_ch)
    for i in range(count):
        key_pos = tl.load(indices_ptr + b * s_ib + kv_h * s_ih + i) * BLOCK + tl.arange(0, BLOCK)
        k_ptrs = k_ptr + b * s_kb + kv_h * s_kh + key_pos[:, None] * s_kl + d[None, :]
        v_ptrs = v_ptr + b * s_vb + kv_h * s_vh + key_pos[:, None] * s_vl + dv[None, :]
        mask_ptrs = mask_ptr + b * s_mb + head[:, None] * s_mh + pos[:, None] * s_mq + key_pos[None, :] * s_mk
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_ptrs, v_ptrs, key_pos, q_pos, row_ok, mask_ptrs,
                                      kv_len, IS_CAUSAL, HAS_MASK, MASK_BOOL, PRECISION)
    out = _normalized(acc, l_i)
    tl.store(o_ptr + b * s_ob + pos[:, None] * s_ol + head[:, None] * s_oh + dv[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & (dv[None, :] < HEAD_DIM_V))


def block_sparse_decode_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                               is_causal: bool, scale: float | None, counts: torch.Tensor,
                               indices: torch.Tensor, block_size: int) -> torch.Tensor:
    """Decode: a few query rows (one query block) per batch row; the group's heads share each K/V load."""
    out, (tensors, qk_scale, strides), constexprs = _attention_launch(q, k, v, mask, is_causal, scale, block_size)
    batch, q_heads, q_len = q.shape[:3]
    kv_heads, kv_len = k.shape[1], k.shape[2]
    if q_len > block_size:
        raise ValueError(f"the decode kernel takes one query block (<= {block_size} rows), got {q_len}")
    groups = q_heads // kv_heads
    _block_sparse_decode_kernel[(batch * kv_heads,)](
        *tensors, counts, indices, q_len, kv_len, qk_scale, groups, kv_heads,
        *strides, *counts.stride()[:2], *indices.stride()[:2],
        ROWS=max(16, triton.next_power_of_2(groups * q_len)), **constexprs)
    return out


# --- fused scoring + selection of one plan row ----------------------------------------------------------------

@triton.jit
def _pooled_select_kernel(
    qp_ptr, kp_ptr, logn_ptr, counts_ptr, indices_ptr,
    nk, kv_heads, q_len, kv_len, top_k, amount, scale,
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_lb, s_cb, s_ch, s_ib, s_ih, s_iq,
    BLOCK: tl.constexpr, NK_P2: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    SELECTOR: tl.constexpr, IS_CAUSAL: tl.constexpr, SINKS: tl.constexpr, LOCAL: tl.constexpr,
):
    r = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // kv_heads).to(tl.int64)
    h = bh % kv_heads
    j = tl.arange(0, NK_P2)
    d = tl.arange(0, BLOCK_D)
    in_range = j < nk
    # scores: pooled query row · every pooled key block (NK_P2 × BLOCK_D stays in registers)
    qp = tl.load(qp_ptr + b * s_qb + h * s_qh + r * s_qn + d, mask=d < HEAD_DIM, other=0.0)
    kp = tl.load(kp_ptr + b * s_kb + h * s_kh + j[:, None] * s_kn + d[None, :],
                 mask=in_range[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    logn = tl.load(logn_ptr + b * s_lb + j, mask=in_range, other=float("-inf"))  # -inf: block has no keys
    scores = tl.sum(kp * qp[None, :], axis=1) * scale + logn

    last = tl.minimum((r + 1) * BLOCK, q_len) - 1 + (kv_len - q_len)
    diagonal = tl.minimum(tl.maximum(last // BLOCK, 0), nk - 1)
    valid = in_range & (logn > float("-inf"))
    if IS_CAUSAL:
        valid = valid & (j * BLOCK <= last)
    forced = valid & ((j < SINKS) | ((j <= diagonal) & (j > diagonal - LOCAL)))
    n_valid = tl.sum(valid.to(tl.int32), axis=0)
    n_forced = tl.sum(forced.to(tl.int32), axis=0)
    ranked = tl.where(forced, float("inf"), tl.where(valid, scores, float("-inf")))

    # sort by (score desc, block id asc): pack the order-preserving int32 image of the score above the id
    bits = ranked.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    packed = (key.to(tl.int64) << 32) | (NK_P2 - 1 - j).to(tl.int64)
    packed = tl.sort(packed, descending=True)
    order = (NK_P2 - 1 - (packed & 0xFFFFFFFF)).to(tl.int32)
    rank = tl.arange(0, NK_P2)
    if SELECTOR == 0:  # topk
        wanted = top_k
    elif SELECTOR == 1:  # keep_ratio
        wanted = tl.ceil(n_valid.to(tl.float32) * amount - 1e-6).to(tl.int32)
    else:  # mass: fewest blocks whose softmax mass reaches the amount, forced blocks counted first
        usable = rank < n_valid
        ks = tl.load(kp_ptr + b * s_kb + h * s_kh + order[:, None] * s_kn + d[None, :],
                     mask=usable[:, None] & (d[None, :] < HEAD_DIM), other=0.0)  # keys in sorted order
        sorted_scores = tl.sum(ks * qp[None, :], axis=1) * scale + tl.load(logn_ptr + b * s_lb + order,
                                                                           mask=usable, other=0.0)
        top = tl.max(tl.where(usable, sorted_scores, float("-inf")), axis=0)
        p = tl.where(usable, tl.exp(sorted_scores - top), 0.0)
        p = p / tl.sum(p, axis=0)
        before = tl.cumsum(p, axis=0) - p
        wanted = tl.sum(((before < amount - 1e-6) & usable).to(tl.int32), axis=0)
    count = tl.minimum(tl.maximum(wanted, n_forced), n_valid)
    chosen = tl.sort(tl.where(rank < count, order, NK_P2), descending=False)
    out = indices_ptr + b * s_ib + h * s_ih + r * s_iq
    tl.store(out + rank, tl.where(rank < count, chosen, 0), mask=rank < nk)
    tl.store(counts_ptr + b * s_cb + h * s_ch + r, count)


def pooled_select_triton(q_pooled: torch.Tensor, k_pooled: torch.Tensor, keys_per_block: torch.Tensor,
                         q_len: int, kv_len: int, scale: float, block_size: int, selector: str, amount: float,
                         is_causal: bool, sink_blocks: int, local_blocks: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The plan from pooled queries [B, Hkv, NQ, D] and keys [B, Hkv, NK, D] (real keys per block
    [B, NK]): scores, validity, forced blocks and the selector in one program per plan row."""
    batch, kv_heads, nq, dim = q_pooled.shape
    nk = k_pooled.shape[2]
    q_pooled, k_pooled = q_pooled.float().contiguous(), k_pooled.float().contiguous()
    log_keys = torch.where(keys_per_block > 0, keys_per_block.float().clamp(min=1).log(),
                           float("-inf")).contiguous()
    counts = torch.empty(batch, kv_heads, nq, dtype=torch.int32, device=q_pooled.device)
    indices = torch.empty(batch, kv_heads, nq, nk, dtype=torch.int32, device=q_pooled.device)
    _pooled_select_kernel[(nq, batch * kv_heads)](
        q_pooled, k_pooled, log_keys, counts, indices,
        nk, kv_heads, q_len, kv_len, int(amount), float(amount), scale,
        q_pooled.stride(0), q_pooled.stride(1), q_pooled.stride(2),
        k_pooled.stride(0), k_pooled.stride(1), k_pooled.stride(2), log_keys.stride(0),
        counts.stride(0), counts.stride(1), indices.stride(0), indices.stride(1), indices.stride(2),
        BLOCK=block_size, NK_P2=max(16, triton.next_power_of_2(nk)), BLOCK_D=max(16, triton.next_power_of_2(dim)),
        HEAD_DIM=dim, SELECTOR=SELECTORS.index(selector), IS_CAUSAL=is_causal, SINKS=sink_blocks,
        LOCAL=local_blocks)
    return counts, indices


def pooled_plan(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
                scale: float | None, block_size: int, selector: str, amount: float, sink_blocks: int,
                local_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``build_plan`` for the pooled estimator: torch pools (memory-bound), one kernel scores and selects."""
    key_valid = None if mask is None else key_validity(mask, q.shape[0], k.shape[2], q.device)
    q_pooled, k_pooled, keys = pool_blocks(q, k, key_valid, block_size)
    scale = softmax_scale(scale, q.shape[-1])
    return pooled_select_triton(q_pooled, k_pooled, keys, q.shape[2], k.shape[2], scale, block_size, selector,
                                amount, is_causal, sink_blocks, local_blocks)
