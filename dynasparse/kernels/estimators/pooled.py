"""Pooled: mean query block · mean key block (SeerAttention, MInference's block mode)."""
from __future__ import annotations

import torch

from dynasparse.kernels.blocks import keys_per_block, pad_to_blocks
from dynasparse.kernels.estimators.base import EstimatorInputs


def pool_blocks(q: torch.Tensor, k: torch.Tensor, key_valid: torch.Tensor | None, block_size: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean query of each query block (over its rows and the group's heads) [B, Hkv, NQ, D], mean real key
    of each KV block [B, Hkv, NK, D], and the real keys per KV block [B, NK]."""
    batch, q_heads, q_len, dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    rows = keys_per_block(None, 1, q_len, block_size, q.device)[0]  # real query rows per block
    q_blocks = pad_to_blocks(q.float(), 2, block_size).view(batch, kv_heads, q_heads // kv_heads, -1,
                                                             block_size, dim)
    q_pooled = q_blocks.sum(dim=(2, 4)) / (rows[:, None] * (q_heads // kv_heads))
    weights = torch.ones(batch, kv_len, device=k.device) if key_valid is None else key_valid.float()
    k_weighted = k.float() * weights[:, None, :, None]
    k_sums = pad_to_blocks(k_weighted, 2, block_size).view(batch, kv_heads, -1, block_size, dim).sum(3)
    counts = keys_per_block(key_valid, batch, kv_len, block_size, k.device)
    return q_pooled, k_sums / counts.clamp(min=1)[:, None, :, None], counts


def pooled_scores(x: EstimatorInputs) -> torch.Tensor:
    """Pooled query · pooled key, plus the log of the block's real keys: a block of n similar keys holds
    about n times one key's mass. Cheap (one small matmul over block means) and training-free, but a single
    heavy key is averaged away with its neighbours. Blocks without real keys score -inf."""
    q_pooled, k_pooled, counts = pool_blocks(x.q, x.k, x.key_valid, x.block_size)
    scores = (q_pooled @ k_pooled.transpose(-1, -2)) * x.scale + counts.clamp(min=1).log()[:, None, None, :]
    return scores.masked_fill(counts[:, None, None, :] == 0, float("-inf"))
