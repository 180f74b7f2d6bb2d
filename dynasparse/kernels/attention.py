"""Dense attention: the reference every sparse variant is checked against.

Semantics of the canonical op (shared by the reference, the fast path and the ONNX translation):
q is [B, Hq, Lq, D], k and v are [B, Hkv, Lk, D*] with Hq a multiple of Hkv (grouped-query attention:
query head h reads kv head h // (Hq // Hkv)). ``mask`` broadcasts to [B, Hq, Lq, Lk] and is either boolean
(True = may attend; a row with no allowed key gives 0, as SDPA does) or additive float. ``is_causal`` is bottom-right aligned: query i sees keys
j <= i + Lk - Lq, which is the usual causal mask when Lq == Lk and the right one for a KV cache.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def softmax_scale(scale: float | None, head_dim: int) -> float:
    """The scale a site gives its logits: its own, else SDPA's default 1/sqrt(head dim). Canonicalization
    writes it into every site, so graphs never carry None; direct calls of the kernels may."""
    return 1.0 / math.sqrt(head_dim) if scale is None else scale


def causal_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """Boolean [Lq, Lk] mask, bottom-right aligned."""
    q_pos = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    return q_pos >= torch.arange(kv_len, device=device)[None, :]


def combined_mask(mask: torch.Tensor | None, is_causal: bool, q_len: int, kv_len: int,
                  dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """One additive-or-boolean mask that folds ``is_causal`` into ``mask``."""
    if not is_causal:
        return mask
    causal = causal_mask(q_len, kv_len, device)
    if mask is None:
        return causal
    if mask.dtype == torch.bool:
        return mask & causal
    return mask.masked_fill(~causal, torch.finfo(mask.dtype if mask.is_floating_point() else dtype).min)


def key_validity(mask: torch.Tensor | None, batch: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """[B, Lk] bool: keys some query may attend to (padding is the keys no query sees)."""
    if mask is None:
        return torch.ones(batch, kv_len, dtype=torch.bool, device=device)
    allowed = key_visibility(mask, False, mask.shape[-2] if mask.dim() > 1 else 1, kv_len, device)
    return allowed.expand(batch, allowed.shape[1], allowed.shape[2], kv_len).any(dim=2).any(dim=1)


def key_visibility(mask: torch.Tensor | None, is_causal: bool, q_len: int, kv_len: int,
                   device: torch.device) -> torch.Tensor:
    """[B or 1, H or 1, Lq, Lk] bool: which key each query may read (the mask, causality bottom-right)."""
    allowed = combined_mask(mask, is_causal, q_len, kv_len, torch.float32, device)
    if allowed is None:
        return torch.ones(1, 1, q_len, kv_len, dtype=torch.bool, device=device)
    if allowed.dtype != torch.bool:
        allowed = allowed > torch.finfo(allowed.dtype).min / 2
    while allowed.dim() < 4:
        allowed = allowed.unsqueeze(0)
    return allowed


def probe_attention(q: torch.Tensor, k: torch.Tensor, rows: slice | torch.Tensor, positions: torch.Tensor,
                    mask: torch.Tensor | None, is_causal: bool, scale: float) -> torch.Tensor:
    """[B, Hkv, P, Lk] fp32: the real attention probabilities of a few probe queries (``q``'s ``rows``, at
    key-axis ``positions`` [P] for causality), summed over each KV head's group of query heads. What the
    estimators and selectors that read a window of queries' attention all compute first."""
    groups = q.shape[1] // k.shape[1]
    logits = (q[:, :, rows].float() @ k.float().repeat_interleave(groups, 1).transpose(-1, -2)) * scale
    if mask is not None:
        probe_rows = mask[..., rows, :] if mask.dim() > 1 and mask.shape[-2] != 1 else mask
        logits = (logits.masked_fill(~probe_rows, float("-inf")) if probe_rows.dtype == torch.bool
                  else logits + probe_rows.float())
    if is_causal:
        later = torch.arange(k.shape[2], device=q.device)[None, :] > positions[:, None]
        logits = logits.masked_fill(later, float("-inf"))
    probs = logits.softmax(-1).nan_to_num(0.0)  # [B, Hq, P, Lk]
    return probs.view(q.shape[0], k.shape[1], groups, -1, k.shape[2]).sum(2)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                        is_causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """Explicit softmax(q k^T * scale + mask) v in fp32: the oracle for kernels and tests."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1).float()
    v = v.repeat_interleave(groups, dim=1).float()
    scale = softmax_scale(scale, q.shape[-1])
    scores = (q.float() @ k.transpose(-2, -1)) * scale
    full = combined_mask(mask, is_causal, q.shape[-2], k.shape[-2], torch.float32, q.device)
    if full is None:
        return (scores.softmax(dim=-1) @ v).to(q.dtype)
    if full.dtype != torch.bool:
        return ((scores + full.float()).softmax(dim=-1) @ v).to(q.dtype)
    probs = scores.masked_fill(~full, float("-inf")).softmax(dim=-1)
    return (probs.nan_to_num(0.0) @ v).to(q.dtype)  # a row with no allowed key gives 0, as SDPA does


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                   is_causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """The dense fast path: PyTorch's fused SDPA (flash / memory-efficient / CPU flash kernels).

    Called with the same arguments the captured model used, so a canonicalized graph is bit-identical to
    the original. SDPA's own ``is_causal`` is top-left aligned, so it is only used when Lq == Lk. One
    query per head (decoding) with grouped K/V stacks each group's query heads on the query axis, so
    every K/V head is read once rather than once per query head.
    """
    q_len, kv_len = q.shape[-2], k.shape[-2]
    groups = q.shape[1] // k.shape[1]
    if q_len == 1:
        is_causal = False  # bottom-right aligned: the one query sees every key
    if is_causal and (mask is not None or q_len != kv_len):
        mask, is_causal = combined_mask(mask, True, q_len, kv_len, q.dtype, q.device), False
    if q_len == 1 and groups > 1 and (mask is None or mask.dim() < 3 or mask.shape[-3] == 1):
        batch, q_heads, _, head_dim = q.shape
        out = F.scaled_dot_product_attention(q.reshape(batch, k.shape[1], groups, head_dim), k, v, attn_mask=mask,
                                             scale=scale)
        return out.reshape(batch, q_heads, 1, -1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                          enable_gqa=groups > 1)
