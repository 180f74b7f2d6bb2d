"""How a sequence is cut into blocks of ``block_size`` tokens: shared by the block-sparse plan, the estimators
that score its blocks and the kernels that read it, so all of them count blocks and positions alike."""
from __future__ import annotations

import torch


def num_blocks(length: int, block_size: int) -> int:
    return (length + block_size - 1) // block_size


def pad_to_blocks(x: torch.Tensor, dim: int, block_size: int) -> torch.Tensor:
    """Zero-pad ``x`` along ``dim`` to a whole number of blocks, so it reshapes into [..., blocks, block_size]."""
    extra = -x.shape[dim] % block_size
    if not extra:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, extra]
    return torch.nn.functional.pad(x, pad)


def last_query_positions(q_len: int, kv_len: int, block_size: int, device: torch.device) -> torch.Tensor:
    """[NQ]: key-axis position of each query block's last query (bottom-right alignment)."""
    ends = torch.arange(1, num_blocks(q_len, block_size) + 1, device=device) * block_size
    return ends.clamp(max=q_len) - 1 + (kv_len - q_len)


def keys_per_block(key_valid: torch.Tensor | None, batch: int, kv_len: int, block_size: int,
                   device: torch.device) -> torch.Tensor:
    """[B, NK] float: real keys in each KV block (the last block may be short; padding does not count)."""
    ones = torch.ones(batch, kv_len, device=device) if key_valid is None else key_valid.float()
    return pad_to_blocks(ones, 1, block_size).view(batch, -1, block_size).sum(-1)
