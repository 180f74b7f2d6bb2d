"""What a cache policy sees of one step: ``Candidates``, built in one place for every cache kernel."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from dynasparse.kernels.attention import softmax_scale


@dataclasses.dataclass
class Candidates:
    """One step's eviction candidates as a policy sees them: the cache's slots and the step's new tokens,
    the attention masses the observed queries gave them (zeros for a policy that reads no attention), and
    the step's queries. S is the number of slots the step considers, T its new tokens."""

    scores: torch.Tensor  # [B, Hkv, S] the scores held for the slots
    positions: torch.Tensor  # [B, Hkv, S] each slot's token position; -1: empty
    keys: torch.Tensor  # [B, Hkv, S, D] the slots' keys
    values: torch.Tensor  # [B, Hkv, S, Dv]
    mass_cache: torch.Tensor  # [B, Hkv, S]
    new_positions: torch.Tensor  # [B, Hkv, T]; -1: padding
    new_keys: torch.Tensor  # [B, Hkv, T, D], in the order of ``new_positions``
    new_values: torch.Tensor  # [B, Hkv, T, Dv]
    mass_new: torch.Tensor  # [B, Hkv, T]
    queries: torch.Tensor  # [B, Hq, T, D] the step's queries
    observed: torch.Tensor  # [B, T] weights of the queries ``observe`` chose
    scale: float  # the softmax scale of the site
    pool: int  # SnapKV's pooling kernel


def step_candidates(cache: Sequence[torch.Tensor], slots: int, new: Sequence[torch.Tensor],
                    new_positions: torch.Tensor, masses: tuple[torch.Tensor, torch.Tensor] | None,
                    observed: torch.Tensor, scale: float | None, pool: int) -> Candidates:
    """``Candidates`` of a step from the layer's ``cache`` (keys, values, positions, scores), of which the
    first ``slots`` are considered, and the step's ``new`` (q, k, v) tokens at ``new_positions`` ([B, T], or
    [B, Hkv, T] where a kernel already placed them per head). ``masses``: (of the slots, of the new tokens);
    None for a step that computed none (zeros). ``scale``: the site's (None: 1/sqrt(D))."""
    keys, values, positions, scores = (tensor[:, :, :slots] for tensor in cache)
    q, k, v = new
    batch, kv_heads, length = k.shape[:3]
    if new_positions.dim() == 2:
        new_positions = new_positions[:, None, :].expand(batch, kv_heads, length)
    if masses is None:
        masses = torch.zeros_like(scores), scores.new_zeros(batch, kv_heads, length)
    return Candidates(scores, positions, keys, values, masses[0], new_positions, k, v, masses[1], q, observed,
                      softmax_scale(scale, q.shape[-1]), pool)
