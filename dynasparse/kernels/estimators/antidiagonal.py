"""Antidiagonal: sums along the antidiagonals of small tiles of the real scores (XAttention)."""
from __future__ import annotations

import torch

from dynasparse.kernels.blocks import num_blocks, pad_to_blocks
from dynasparse.kernels.estimators.base import EstimatorInputs

STRIDE = 8  # tile side: 1/8 of dense QK^T; stride 16 halves that but lost quality on SmolLM2
_CHUNK = 1024  # queries per step: bounds the tile scores' memory, skips tiles past the diagonal


def antidiagonal_scores(x: EstimatorInputs, stride: int = STRIDE) -> torch.Tensor:
    """XAttention's estimate: cut the score matrix into ``stride`` x ``stride`` tiles and let the sum along
    each tile's antidiagonal stand for the tile. Every query row and every key column enters each row of
    tiles once, so a heavy key (a sink, a delimiter) is never averaged away as in pooling, and each query
    block is scored from its own queries, unlike a probe at the end of the prompt. Softmax over a row of
    tiles, summed into blocks and over the group's heads, estimates each block's share of the mass.
    Costs ``1/stride`` of dense QK^T, computed as one matmul of strided, flipped queries against strided keys."""
    q, k, block_size, is_causal = x.q, x.k, x.block_size, x.is_causal
    batch, q_heads, q_len, dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    groups, stride = q_heads // kv_heads, min(stride, block_size)
    per_block = block_size // stride
    nq, nk = num_blocks(q_len, block_size), num_blocks(kv_len, block_size)
    # Row t of q_tiles holds queries t*S, ..., t*S+S-1, row u of k_tiles keys u*S+S-1, ..., u*S (flipped, and
    # scaled so a sum of S products reads as one score): their dot product is the antidiagonal sum of tile (t, u).
    q_tiles = pad_to_blocks(q.float(), 2, block_size).reshape(batch, kv_heads, groups, nq * per_block, stride * dim)
    k_tiles = pad_to_blocks(k.float(), 2, block_size).reshape(batch, kv_heads, nk * per_block, stride, dim)
    k_tiles = k_tiles.flip(3).reshape(batch, kv_heads, nk * per_block, stride * dim) * (x.scale / stride)
    keys = torch.ones(batch, kv_len, dtype=torch.bool, device=q.device) if x.key_valid is None else x.key_valid
    tile_has_keys = pad_to_blocks(keys, 1, block_size).view(batch, 1, 1, 1, -1, stride).any(-1)  # [B,1,1,1,NKT]
    query_tiles = torch.arange(nq * per_block, device=q.device)
    tile_last_key = (query_tiles * stride + stride - 1).clamp(max=q_len - 1) + (kv_len - q_len)
    tile_rows = ((query_tiles * stride) < q_len).float()  # tiles holding real queries
    mass = torch.zeros(batch, kv_heads, nq * per_block, nk * per_block, device=q.device)
    chunk = max(_CHUNK // stride, per_block)
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
