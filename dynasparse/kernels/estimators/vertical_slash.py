"""Vertical-slash: the last queries' real attention, read along key columns and diagonals (MInference)."""
from __future__ import annotations

import torch

from dynasparse.kernels.attention import probe_attention
from dynasparse.kernels.blocks import last_query_positions, num_blocks, pad_to_blocks
from dynasparse.kernels.estimators.base import EstimatorInputs


def vertical_slash_scores(x: EstimatorInputs) -> torch.Tensor:
    """MInference's probe: the last ``window`` queries attend to every key for real; the probabilities,
    summed over those queries and the group's heads, are read along key columns (vertical lines: keys every
    query wants) and along diagonals (slash lines: keys at a fixed distance). A block's score is the mass
    its columns carry plus the mass of the diagonals crossing it. Works because attention in long prompts
    concentrates on a few such lines, which the last queries already show; costs ``window`` rows of QK^T."""
    q, k, block_size = x.q, x.k, x.block_size
    batch, _, q_len, _ = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    window = min(x.window, q_len)
    positions = torch.arange(window, device=q.device) + (kv_len - window)  # key-axis position of probe rows
    probs = probe_attention(q, k, slice(q_len - window, None), positions, x.mask, x.is_causal, x.scale)
    vertical = pad_to_blocks(probs.sum(2), 2, block_size).view(batch, kv_heads, -1, block_size).sum(-1)

    # slash[d]: mass at distance d = query position - key position (d >= 0: the causal side).
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
