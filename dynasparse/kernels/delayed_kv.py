"""dKV-Cache (Ma et al., 2025): a bidirectional model's keys and values kept across denoising steps.

A masked-diffusion LM re-reads its whole sequence at every denoising step, yet a token changes little once
it is decoded. So a step runs the blocks on the *active* tokens only (the still-masked ones, and those
decoded a step ago: their keys change once, when their input turns from the mask into the token), and every
active query still attends over every key: the fresh ones, written into the cache at their positions, and
the cached ones of everyone else. A step whose active set is the whole sequence (a refresh) computes
exactly what the model computes.

A diffusion transformer's head reads every token (unpatchify), so there the stream leaving the last block
is written into a cache of the whole sequence as well: a token not computed this step keeps the block
output of the step that last computed it (RAS, ToCa).
"""
from __future__ import annotations

import torch

from dynasparse.kernels.attention import attention_sdpa


def gather_active(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The rows of ``hidden`` [B or 1, L, D] at ``index`` [B, A] (positions, each row its own): [B, A, D]."""
    return hidden.expand(index.shape[0], -1, -1).gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))


def scatter_active(active: torch.Tensor, cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Write ``active`` [B, A, D] into ``cache`` [B, L, D] at ``index`` [B, A]; return the whole stream (a
    copy, so the graph's later ops never alias the cache the next step writes)."""
    cache.scatter_(1, index[..., None].expand(-1, -1, cache.shape[-1]), active.to(cache.dtype))
    return cache.to(active.dtype, copy=True)


def _mask_rows(mask: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    """A mask with one row per query position ([.., L, L]) cut to the active queries' rows ([B, .., A, L]);
    a mask broadcast over queries ([.., 1, L]) stays as it is."""
    if mask is None or mask.dim() < 2 or mask.shape[-2] == 1:
        return mask
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    batch, active = index.shape
    full = mask.expand(batch, *mask.shape[1:])
    rows = index[:, None, :, None].expand(batch, full.shape[1], active, full.shape[-1])
    return full.gather(2, rows)


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     key_cache: torch.Tensor, value_cache: torch.Tensor, index: torch.Tensor,
                     scale: float | None) -> torch.Tensor:
    """Write the active tokens' keys and values (``k``, ``v`` [B, Hkv, A, D]) into the caches [B, Hkv, L, D]
    at ``index`` [B, A], then attend the active queries ``q`` [B, Hq, A, D] over the whole cache,
    bidirectionally. Returns sequence-major [B, A, Hq, Dv], as the canonical attention op does."""
    slots = index[:, None, :, None]
    key_cache.scatter_(2, slots.expand(-1, key_cache.shape[1], -1, key_cache.shape[-1]), k.to(key_cache.dtype))
    value_cache.scatter_(2, slots.expand(-1, value_cache.shape[1], -1, value_cache.shape[-1]),
                         v.to(value_cache.dtype))
    out = attention_sdpa(q, key_cache.to(q.dtype), value_cache.to(q.dtype), _mask_rows(mask, index), False, scale)
    return out.transpose(1, 2).contiguous()
