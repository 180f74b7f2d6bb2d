"""Triton kernels for the two token-merging steps that torch does badly on GPU.

``best_match``: every src slot's most similar dst slot (cosine of the metric). The reference builds the full
[B, L, L] score matrix and reduces it; here one program owns a block of query rows and streams blocks of dst
columns through SRAM, keeping only a running max and argmax, so memory stays O(B * L) (flash-attention style).

``merge_scatter``: size-weighted sums of the slots sent to each target. Each program adds its rows into fp32
buffers with ``tl.atomic_add``; the division by the summed size and the dtype cast are one torch op.

Both follow the torch references in ``dynasparse.kernels.token_merge`` (the oracle in the tests). The wrappers
allocate on the input's device and never check ``is_cuda``, so ``TRITON_INTERPRET=1`` runs them on CPU tensors.
Only long-stable ``tl`` APIs are used (load/store/dot/sum/max/min/where/atomic_add), for triton 3.6 and later.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# ----------------------------------------------------------------------------------------------------------
# best_match: streaming cosine argmax over dst columns
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _best_match_kernel(
    metric_ptr, src_ptr, dst_ptr, best_ptr, index_ptr,
    L, C,
    stride_mb, stride_ml, stride_mc,
    stride_sb, stride_sl,
    stride_db, stride_dl,
    stride_ob, stride_ol,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0)  # row blocks on axis 0, which has no 65535 limit
    pid_b = tl.program_id(1).to(tl.int64)  # int64 so batch offsets of large tensors cannot overflow
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < L
    offs_c = tl.arange(0, BLOCK_C)
    base = metric_ptr + pid_b * stride_mb

    # Squared norms of the query rows (C is walked in BLOCK_C chunks; one chunk when C <= BLOCK_C).
    q_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + offs_c
        q = tl.load(base + rows[:, None] * stride_ml + cc[None, :] * stride_mc,
                    mask=row_ok[:, None] & (cc < C)[None, :], other=0.0).to(tl.float32)
        q_sq += tl.sum(q * q, axis=1)
    q_norm = tl.maximum(tl.sqrt(q_sq), 1e-12)  # clamp as the reference does: a zero row scores 0

    best = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    index = tl.zeros([BLOCK_M], dtype=tl.int32)
    for n0 in range(0, L, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < L
        is_dst = tl.load(dst_ptr + pid_b * stride_db + cols * stride_dl, mask=col_ok, other=0) != 0

        # Raw dot products and the column norms, accumulated over chunks of C.
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        k_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + offs_c
            c_ok = cc < C
            q = tl.load(base + rows[:, None] * stride_ml + cc[None, :] * stride_mc,
                        mask=row_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
            # dst block loaded already transposed: [BLOCK_C, BLOCK_N]
            kt = tl.load(base + cc[:, None] * stride_mc + cols[None, :] * stride_ml,
                         mask=c_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            # fp32 "ieee" (no TF32): the reference upcasts too, and near-ties must resolve to the same dst.
            # (Also the only dot the interpreter gets right for bf16.) L^2*C FMAs: small beside the attention.
            acc = tl.dot(q, kt, acc, input_precision="ieee")
            k_sq += tl.sum(kt * kt, axis=0)
        k_norm = tl.maximum(tl.sqrt(k_sq), 1e-12)
        scores = acc / q_norm[:, None] / k_norm[None, :]
        scores = tl.where(is_dst[None, :], scores, float("-inf"))

        # Block argmax with the lowest index on ties, then a strictly-greater update: the first max overall,
        # as torch.max(dim=-1) returns. A block with no dst (all -inf) never updates.
        blk_best = tl.max(scores, axis=1)
        blk_index = tl.min(tl.where(scores == blk_best[:, None], cols[None, :], 2147483647), axis=1)
        better = blk_best > best
        best = tl.where(better, blk_best, best)
        index = tl.where(better, blk_index, index)

    # Rows that are not src: score -inf, index 0.
    is_src = tl.load(src_ptr + pid_b * stride_sb + rows * stride_sl, mask=row_ok, other=0) != 0
    best = tl.where(is_src, best, float("-inf"))
    index = tl.where(is_src, index, 0)
    out = pid_b * stride_ob + rows * stride_ol
    tl.store(best_ptr + out, best, mask=row_ok)
    tl.store(index_ptr + out, index.to(tl.int64), mask=row_ok)


def best_match_triton(metric: torch.Tensor, is_src: torch.Tensor, is_dst: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """For every slot: cosine similarity to its most similar dst and that dst's index.

    ``metric`` [B, L, C] (fp32/fp16/bf16), ``is_src``/``is_dst`` [B, L] bool. Returns (best [B, L] float32,
    index [B, L] int64); rows that are not src get -inf and 0, as in ``best_match_reference``.
    """
    batch, length, channels = metric.shape
    best = torch.empty(batch, length, dtype=torch.float32, device=metric.device)
    index = torch.empty(batch, length, dtype=torch.int64, device=metric.device)
    if best.numel() == 0:
        return best, index
    if channels == 0:  # every row has norm 0: all scores 0, the first dst wins (what the reference gives)
        metric = metric.new_zeros(batch, length, 1)
        channels = 1
    # bool -> uint8 is a free reinterpretation (same itemsize, same strides)
    src = is_src.view(torch.uint8) if is_src.dtype == torch.bool else is_src
    dst = is_dst.view(torch.uint8) if is_dst.dtype == torch.bool else is_dst
    # C up to 32 is one masked chunk, wider metrics are walked in chunks of 32: the fp32 FMA dot is register
    # hungry, and 64x64 tiles with 32-wide chunks and 8 warps are the largest that compile without spills (sm_90).
    block_c = max(16, min(32, triton.next_power_of_2(channels)))  # tl.dot needs every dim >= 16
    block_m, block_n = 64, 64
    grid = (triton.cdiv(length, block_m), batch)
    _best_match_kernel[grid](
        metric, src, dst, best, index,
        length, channels,
        metric.stride(0), metric.stride(1), metric.stride(2),
        src.stride(0), src.stride(1),
        dst.stride(0), dst.stride(1),
        best.stride(0), best.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_C=block_c, num_warps=8,
    )
    return best, index


# ----------------------------------------------------------------------------------------------------------
# merge_scatter: size-weighted scatter-add into the merged layout
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _merge_scatter_kernel(
    x_ptr, size_ptr, target_ptr, sum_ptr, new_size_ptr,
    L, H, capacity,
    stride_xb, stride_xl, stride_xh,
    stride_sb, stride_sl,
    stride_tb, stride_tl,
    stride_ob, stride_ot, stride_oh,
    stride_nb, stride_nt,
    BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_l = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_h = tl.program_id(2)
    rows = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < L
    col_ok = cols < H

    size = tl.load(size_ptr + pid_b * stride_sb + rows * stride_sl, mask=row_ok, other=0.0).to(tl.float32)
    target = tl.load(target_ptr + pid_b * stride_tb + rows * stride_tl, mask=row_ok, other=0)
    # Weightless slots (padding, pruned tokens) add nothing: skipping them spares the atomics that would all
    # pile onto slot 0. Out-of-range targets are dropped rather than written out of bounds.
    live = row_ok & (size != 0.0) & (target >= 0) & (target < capacity)

    x = tl.load(x_ptr + pid_b * stride_xb + rows[:, None] * stride_xl + cols[None, :] * stride_xh,
                mask=live[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    dest = sum_ptr + pid_b * stride_ob + target[:, None] * stride_ot + cols[None, :] * stride_oh
    # relaxed: only the sums matter, nothing is ordered against them inside the kernel
    tl.atomic_add(dest, x * size[:, None], mask=live[:, None] & col_ok[None, :], sem="relaxed")

    # The sizes are summed once per row, by the programs that own the first hidden block.
    if pid_h == 0:
        tl.atomic_add(new_size_ptr + pid_b * stride_nb + target * stride_nt, size, mask=live, sem="relaxed")


def merge_scatter_triton(x: torch.Tensor, size: torch.Tensor, target: torch.Tensor, capacity: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average of the slots sent to each target slot; empty targets give 0.

    ``x`` [B, L, H], ``size`` [B, L] float32, ``target`` [B, L] int64 in [0, capacity). Returns
    (new_x [B, capacity, H] in x.dtype, new_size [B, capacity] float32). Sums are fp32 atomics, so the order
    of the additions (and the last bits of the result) is not deterministic.
    """
    batch, length, hidden = x.shape
    summed = torch.zeros(batch, capacity, hidden, dtype=torch.float32, device=x.device)
    new_size = torch.zeros(batch, capacity, dtype=torch.float32, device=x.device)
    if batch * length * capacity > 0:
        block_l = 16
        block_h = max(16, min(128, triton.next_power_of_2(max(hidden, 1))))
        # at least one hidden block, so the sizes are summed even when H == 0
        grid = (triton.cdiv(length, block_l), batch, max(1, triton.cdiv(hidden, block_h)))
        _merge_scatter_kernel[grid](
            x, size, target, summed, new_size,
            length, hidden, capacity,
            x.stride(0), x.stride(1), x.stride(2),
            size.stride(0), size.stride(1),
            target.stride(0), target.stride(1),
            summed.stride(0), summed.stride(1), summed.stride(2),
            new_size.stride(0), new_size.stride(1),
            BLOCK_L=block_l, BLOCK_H=block_h,
        )
    new_x = (summed / new_size.clamp_min(1e-12)[..., None]).to(x.dtype)
    return new_x, new_size.to(size.dtype)
