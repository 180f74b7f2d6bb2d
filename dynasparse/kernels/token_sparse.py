"""Token Sparse Attention: per KV head, attention among a chosen subset of the tokens, scattered back.

Block-sparse attention keeps every query and skips key blocks. Here each KV head (with its group of query
heads) keeps a share of the *tokens*, as queries and as keys: the ones the probe queries attend to most,
plus the probes themselves. Attention runs on that compressed sequence (quadratic in the kept count) and
its output is scattered back to the kept positions; every other token gets zero from this head, so through
the residual it passes the layer's attention unchanged. Causality carries over because the kept positions
stay in order.
"""
from __future__ import annotations

import math

import torch

from dynasparse.kernels.attention import (attention_sdpa, causal_mask, key_visibility, probe_attention,
                                          softmax_scale)


def probe_positions(length: int, window: int, is_causal: bool, device: torch.device) -> torch.Tensor:
    """The queries whose attention scores the tokens: the last ``window`` (causal: they see every key) or
    ``window`` spread evenly over the sequence (bidirectional)."""
    window = min(window, length)
    if is_causal:
        return torch.arange(length - window, length, device=device)
    return torch.linspace(0, length - 1, window, device=device).round().long().unique()


def token_scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, scale: float,
                 probes: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, L]: the attention mass the probe queries of each KV head's group pay every key."""
    return probe_attention(q, k, probes, probes, mask, is_causal, scale).sum(2)


def _causal_only(mask: torch.Tensor, length: int) -> bool:
    """Whether a causal site's mask says nothing beyond causality (no padding, no window): then the kept
    positions, in order, need only SDPA's own causal path, not a gathered mask."""
    allowed = key_visibility(mask, False, mask.shape[-2] if mask.dim() > 1 else 1, length, mask.device)
    return bool((allowed == causal_mask(length, length, mask.device)).all())


def kept_count(length: int, keep: float, probes: int) -> int:
    return min(length, max(math.ceil(keep * length), probes))


def token_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                           is_causal: bool, scale: float | None, keep: float, window: int,
                           min_seq_len: int) -> torch.Tensor:
    """``q`` [B, Hq, L, D], ``k``/``v`` [B, Hkv, L, D*] (self-attention). Returns sequence-major
    [B, L, Hq, Dv], zeros at the tokens a head did not keep. Runs dense below ``min_seq_len`` tokens or at
    ``keep`` >= 1."""
    batch, q_heads, length, _ = q.shape
    kv_heads, groups = k.shape[1], q_heads // k.shape[1]
    if length < min_seq_len or keep >= 1.0:
        return attention_sdpa(q, k, v, mask, is_causal, scale).transpose(1, 2).contiguous()
    scale = softmax_scale(scale, q.shape[-1])
    probes = probe_positions(length, window, is_causal, q.device)
    scores = token_scores(q, k, mask, is_causal, scale, probes)
    scores[..., probes] = float("inf")
    kept = scores.topk(kept_count(length, keep, len(probes)), dim=-1).indices.sort(-1).values  # [B, Hkv, n]
    count = kept.shape[-1]

    def gather(x: torch.Tensor) -> torch.Tensor:  # [B, Hkv, L, D] -> [B, Hkv, n, D]
        return x.gather(2, kept[..., None].expand(-1, -1, -1, x.shape[-1]))

    q_kept = q.view(batch, kv_heads, groups, length, -1).gather(
        3, kept[:, :, None, :, None].expand(-1, -1, groups, -1, q.shape[-1])).view(batch, q_heads, count, -1)
    if mask is not None and is_causal and _causal_only(mask, length):
        mask = None
    mask_kept = None
    if mask is not None:  # rows and columns of the kept positions, per KV head, shared by its group
        full = mask if mask.dim() == 4 else mask.view(*(1,) * (4 - mask.dim()), *mask.shape)
        if full.shape[1] != 1:
            raise ValueError(f"token-sparse attention takes a mask shared by the heads, got {tuple(mask.shape)}")
        full = full.expand(batch, kv_heads, full.shape[2], length)
        columns = full.gather(3, kept[:, :, None, :].expand(-1, -1, full.shape[2], -1))
        rows = columns if columns.shape[2] == 1 else columns.gather(2, kept[..., None].expand(-1, -1, -1, count))
        mask_kept = rows.repeat_interleave(groups, 1)
    out = attention_sdpa(q_kept, gather(k), gather(v), mask_kept, is_causal, scale)  # [B, Hq, n, Dv]
    full_out = out.new_zeros(batch, q_heads, length, out.shape[-1])
    slots = kept.repeat_interleave(groups, 1)[..., None].expand(-1, -1, -1, out.shape[-1])
    return full_out.scatter_(2, slots, out).transpose(1, 2).contiguous()
