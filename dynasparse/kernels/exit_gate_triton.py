"""Triton kernels for the early-exit gate, checked against ``dynasparse.kernels.exit_gate``.

``logit_confidence``: one program per row streams the vocabulary in blocks and keeps only online softmax
statistics (flash-attention style), so the [N, V] probabilities never go to memory: the running max m1 and
runner-up m2, s = sum exp(x - m1) and t = sum exp(x - m1) * (x - m1), both rescaled when m1 grows. Then
p1 = 1 / s, p2 = exp(m2 - m1) / s and H = log s - t / s. A block's runner-up is its max with only the one
argmax lane masked out, so two equal maxima give margin 0. -inf logits add exp(-inf) = 0 to s and are kept
out of t with ``tl.where`` (0 * -inf would be nan).
``compact_rows``: the gather of surviving rows is a plain copy; one program copies one block of one row.

The wrappers allocate on the input's device and never check ``is_cuda``: ``TRITON_INTERPRET=1`` runs them
on CPU tensors.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# --- logit confidence: max probability, top-2 margin, entropy ----------------------------------------------


@triton.jit
def _logit_confidence_kernel(
    logits_ptr, out_ptr, vocab, inv_log_vocab, stride_n, stride_o,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64 so row offsets of large logits cannot overflow
    base = logits_ptr + row * stride_n
    lanes = tl.arange(0, BLOCK_V)
    m1 = tl.full([], float("-inf"), tl.float32)
    m2 = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    t = tl.zeros([], tl.float32)
    for start in range(0, vocab, BLOCK_V):
        cols = start + lanes
        x = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        block_max = tl.max(x, axis=0)
        first = tl.min(tl.where(x == block_max, lanes, BLOCK_V), axis=0)  # one argmax lane, even among ties
        block_second = tl.max(tl.where(lanes == first, float("-inf"), x), axis=0)
        # top-2 of {m1 >= m2} and {block_max >= block_second}
        m2 = tl.maximum(tl.minimum(m1, block_max), tl.maximum(m2, block_second))
        new_max = tl.maximum(m1, block_max)
        # while every value so far is -inf, s and t stay 0 and nothing may be shifted by -inf
        ref = tl.where(new_max == float("-inf"), 0.0, new_max)
        shift = tl.where(m1 == float("-inf"), 0.0, m1 - ref)  # <= 0; s == t == 0 when m1 is -inf
        alpha = tl.exp(shift)
        finite = x != float("-inf")
        d = tl.where(finite, x - ref, 0.0)  # no -inf reaches e * d
        e = tl.where(finite, tl.exp(d), 0.0)
        t = alpha * (t + shift * s) + tl.sum(e * d, axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m1 = new_max
    p1 = 1.0 / s
    p2 = tl.exp(m2 - m1) / s  # m2 == -inf (one finite value, or V == 1) gives 0
    margin = tl.where(vocab > 1, p1 - p2, 0.0)
    entropy = tl.log(s) - t / s
    tl.store(out_ptr + row, p1)
    tl.store(out_ptr + stride_o + row, margin)
    tl.store(out_ptr + 2 * stride_o + row, 1.0 - entropy * inv_log_vocab)


def logit_confidence_triton(logits: torch.Tensor) -> torch.Tensor:
    """``exit_gate.logit_confidence_reference`` of logits [N, V]: [3, N] float32 (max probability, top-2
    margin, 1 - H / log V), one pass over the logits."""
    rows, vocab = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    out = torch.empty(3, rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return out
    inv_log_vocab = 1.0 / math.log(vocab) if vocab > 1 else 0.0  # V == 1: confidence 1 - 0 = 1
    _logit_confidence_kernel[(rows,)](
        logits, out, vocab, inv_log_vocab, logits.stride(0), out.stride(0),
        BLOCK_V=min(triton.next_power_of_2(vocab), 4096))
    return out


# --- compact rows: gather the rows that go on ----------------------------------------------------------------


@triton.jit
def _compact_rows_kernel(
    x_ptr, index_ptr, out_ptr, cols,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # output rows on axis 0, which has no 65535 limit
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    keep = offs < cols
    source = tl.load(index_ptr + row).to(tl.int64)
    values = tl.load(x_ptr + source * cols + offs, mask=keep)
    tl.store(out_ptr + row * cols + offs, values, mask=keep)


def compact_rows_triton(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x.index_select(0, index)`` for x of any rank >= 1 and index int64 [M] (indices must be in range:
    they are not checked, that would cost a host sync)."""
    out = x.new_empty(index.shape[0], *x.shape[1:])
    cols = math.prod(x.shape[1:])
    if out.numel() == 0:
        return out
    x = x.contiguous()
    src, dst = (x.view(torch.uint8), out.view(torch.uint8)) if x.dtype == torch.bool else (x, out)
    block = min(triton.next_power_of_2(cols), 1024)
    _compact_rows_kernel[(index.shape[0], triton.cdiv(cols, block))](
        src, index.contiguous(), dst, cols, BLOCK=block)
    return out
