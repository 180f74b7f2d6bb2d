"""Attention over the compressed tier's blocks on CPU through a small C++ kernel (``kv_tier_cpu.cpp``).

The torch path (``kv_tier.tier_attention_reference``) gathers the blocks a step reads, dequantizes them into
fresh tensors and runs a softmax over them: a dozen ops per layer and step, each a pass over the blocks. The
kernel reads a block at a time: its key codes against the query with the block's scales folded in, its values
dequantized into a tile that stays in cache, all under an online softmax, so a decode step reads each code
once. It builds once per machine; without a compiler the torch path runs.
"""
from __future__ import annotations

from pathlib import Path

import torch

from dynasparse.kernels.cpu_extension import built

SOURCE = Path(__file__).with_name("kv_tier_cpu.cpp")


def usable(q: torch.Tensor) -> bool:
    """On CPU, where the kernel built."""
    return q.device.type == "cpu" and built("dynasparse_tier_cpu", SOURCE, "the compressed tier's torch path")


def tier_attention_cpu(q: torch.Tensor, tier: dict[str, torch.Tensor], chosen: torch.Tensor, bits: int,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``kv_tier.tier_attention_reference``: (out [B, Hkv, R, Dv], lse [B, Hkv, R]) in fp32 for the query
    rows ``q`` [B, Hkv, R, D] over the ``chosen`` [B, Hkv, K] blocks of ``tier``."""
    return torch.ops.dynasparse_tier_cpu.tier_attention(
        q.float(), tier["cold_keys"], tier["cold_key_scale"], tier["cold_key_min"], tier["cold_values"],
        tier["cold_value_scale"], tier["cold_value_min"], tier["cold_positions"], chosen, bits, scale)


def tier_block_bounds_cpu(q: torch.Tensor, tier: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """As ``kv_tier.block_bounds_reference``: [B, Hkv, NB] for the query rows ``q`` [B, Hkv, R, D]."""
    return torch.ops.dynasparse_tier_cpu.tier_block_bounds(q, tier["cold_key_scale"], tier["cold_key_min"],
                                                           tier["cold_positions"], bits)


def tier_decode_attention_cpu(q: torch.Tensor, tier: dict[str, torch.Tensor], chosen: torch.Tensor, bits: int,
                              scale: float, hot_keys: torch.Tensor, hot_values: torch.Tensor,
                              hot_positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor, reduce: str | None
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A decode step over the tier, the hot slots and the token itself in one softmax (``kv_tier._attend_one``
    over ``tier_attention``): (out [B, Hkv, G, Dv] fp32, the hot slots' masses [B, Hkv, S], the token's
    [B, Hkv, 1]), probabilities pooled over the group's heads by ``reduce`` ("max", "sum"; None: zeros)."""
    return torch.ops.dynasparse_tier_cpu.tier_decode_attention(
        q.float(), tier["cold_keys"], tier["cold_key_scale"], tier["cold_key_min"], tier["cold_values"],
        tier["cold_value_scale"], tier["cold_value_min"], tier["cold_positions"], chosen, bits, scale,
        hot_keys, hot_values, hot_positions, k, v, {None: 0, "max": 1, "sum": 2}[reduce])
