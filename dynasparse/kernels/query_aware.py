"""Query-aware decode (TokenSelect / Quest): a decode step reads only the keys its queries weigh most.

Eviction must guess, when it drops a token, whether a later question will need it; a decode step's own
queries know. The cache keeps its tokens (all of them, or its budget) and each step, per KV head, scores
every readable key by the softmax votes of the step's queries (summed over the group's query heads, as
TokenSelect does), keeps the top ``keep`` share and attends over those alone. The compute budget is the
share of keys whose values are read and mixed; scoring still takes one dot product per key.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from dynasparse.kernels.attention import softmax_scale


def query_aware_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
                          scale: float | None, keep: torch.Tensor, observed: torch.Tensor | None = None,
                          pool: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of ``q`` [B, Hq, T, D] over the top keys of ``k`` / ``v`` [B, Hkv, N, D], in fp32.

    ``visible`` [B, 1 or Hq, T, N] bool: what each query may read. ``keep`` [B]: the share of each row's
    readable keys a KV head reads (1.0: all of them, exactly dense attention). ``observed`` [B, T]:
    weights of the queries whose attention masses a cache policy wants, pooled over the queries and the
    group's heads by ``pool(probs, weights)`` (None: summed). Returns (out [B, T, Hq, Dv],
    masses [B, Hkv, N] of the read keys, or None)."""
    batch, q_heads, length, dim = q.shape
    kv_heads, n = k.shape[1], k.shape[2]
    groups = q_heads // kv_heads
    scale = softmax_scale(scale, dim)
    logits = (q.float().reshape(batch, kv_heads, groups * length, dim) @ k.float().transpose(-1, -2)) * scale
    readable = visible.expand(batch, q_heads, length, n).reshape(batch, kv_heads, groups * length, n)
    logits = logits.masked_fill(~readable, -math.inf)
    votes = logits.softmax(-1).nan_to_num(0.0).sum(2)  # [B, Hkv, N]
    any_query = readable.any(2)
    budget = (any_query.sum(-1, keepdim=True) * keep[:, None, None]).ceil().long().clamp(min=1)
    width = min(int(budget.max()), n)
    chosen = votes.masked_fill(~any_query, -1.0).topk(width, dim=-1).indices  # [B, Hkv, W], best first
    within = torch.arange(width, device=q.device) < budget  # [B, Hkv, W]
    picked = logits.gather(-1, chosen[:, :, None, :].expand(batch, kv_heads, groups * length, width))
    probs = picked.masked_fill(~within[:, :, None, :], -math.inf).softmax(-1).nan_to_num(0.0)
    values = v.float().gather(2, chosen[..., None].expand(batch, kv_heads, width, v.shape[-1]))
    out = (probs @ values).reshape(batch, q_heads, length, -1).transpose(1, 2).to(q.dtype).contiguous()
    if observed is None:
        return out, None
    weights = observed.repeat(1, groups)[:, None, :, None]  # [B, 1, G*T, 1], the (g, t) order of the rows
    pooled = (probs * weights).sum(2) if pool is None else pool(probs, weights)
    masses = probs.new_zeros(batch, kv_heads, n).scatter_add_(-1, chosen, pooled)
    return out, masses
