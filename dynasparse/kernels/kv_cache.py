"""The bounded KV cache: slot layout, eviction policies and the torch reference of one cache step.

Layout of one layer's cache (static shapes; the runtime allocates it, the graph mutates it in place):

* ``keys`` [B, Hkv, S, D] and ``values`` [B, Hkv, S, Dv]: post-RoPE, one row per **KV head** (grouped
  query heads share it, K/V are never repeated). ``S = capacity + 1``: the last slot is scratch, where
  tokens dropped on arrival are written so every step is the same fixed-size scatter.
* ``positions`` [B, Hkv, S] int64: the token's index among the row's real tokens; -1 marks an empty slot.
* ``scores`` [B, Hkv, S] float32: the policy's state (accumulated attention for H2O, ...).
* ``seen`` [B] int64: real tokens this layer has taken in so far (padding does not count).

One step takes T new tokens: attend over the valid slots plus the new tokens (the site's own mask and
causality between new tokens), score every candidate, then keep the ``capacity`` best of the
``capacity + T`` candidates: the T lowest are dropped, and each new token that is kept overwrites a
dropped slot. Sinks (``position < sink``) and the recent window (the ``recent`` newest tokens) have
infinite priority; empty slots and padding have none. Slot order is meaningless: attention is
permutation invariant over keys, so eviction never moves data it keeps.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from dynasparse.kernels.attention import combined_mask


# --- policies: what each candidate is worth (kvpress-style, one small class each) -------------------------

class Policy:
    """Scores cache candidates. ``observe`` says which queries' attention the score reads."""

    name: ClassVar[str]
    uses_attention: ClassVar[bool] = True

    def observe(self, query_valid: torch.Tensor, window: int) -> torch.Tensor:
        """[B, T] weights of the new queries whose attention is observed (all real queries by default)."""
        return query_valid.float()

    def update(self, old: torch.Tensor, mass_cache: torch.Tensor, mass_new: torch.Tensor,
               positions: torch.Tensor, step_positions: torch.Tensor, pool: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores of the cached slots [B, Hkv, S], scores of the new tokens [B, Hkv, T])."""
        raise NotImplementedError


class FullPolicy(Policy):
    """No eviction: the runtime sizes the cache to hold every token. The reference for the others."""

    name = "full"
    uses_attention = False

    def update(self, old, mass_cache, mass_new, positions, step_positions, pool):
        return positions.float(), step_positions.float()


class StreamingPolicy(FullPolicy):
    """StreamingLLM: sinks + the recent window; everything else leaves oldest first."""

    name = "streaming"


class H2OPolicy(Policy):
    """Heavy hitters: attention mass accumulated over every query so far, plus the recent window."""

    name = "h2o"

    def update(self, old, mass_cache, mass_new, positions, step_positions, pool):
        return old + mass_cache, mass_new


class TOVAPolicy(Policy):
    """TOVA: the attention of the newest query only; the lowest is dropped."""

    name = "tova"

    def observe(self, query_valid, window):
        return _last_valid(query_valid, 1)

    def update(self, old, mass_cache, mass_new, positions, step_positions, pool):
        return mass_cache, mass_new


class SnapKVPolicy(Policy):
    """SnapKV: the attention of the last ``window`` queries of each chunk, pooled over neighbouring new
    keys (kernel ``pool``) so whole phrases stay. In decode the window is the one new query."""

    name = "snapkv"

    def observe(self, query_valid, window):
        return _last_valid(query_valid, window)

    def update(self, old, mass_cache, mass_new, positions, step_positions, pool):
        if pool > 1 and mass_new.shape[-1] > 1:
            batch, heads, length = mass_new.shape
            pooled = F.avg_pool1d(mass_new.reshape(batch * heads, 1, length), pool, stride=1,
                                  padding=pool // 2, count_include_pad=False)
            mass_new = pooled[..., :length].reshape(batch, heads, length)
        return mass_cache, mass_new


POLICIES: dict[str, Policy] = {p.name: p for p in (FullPolicy(), StreamingPolicy(), H2OPolicy(), TOVAPolicy(),
                                                   SnapKVPolicy())}


def _last_valid(query_valid: torch.Tensor, count: int) -> torch.Tensor:
    """[B, T] weights: 1 on each row's last ``count`` real queries."""
    from_end = query_valid.flip(-1).long().cumsum(-1).flip(-1)  # 1 on the last real query, 2 before it...
    return (query_valid & (from_end <= count)).float()


# --- the cache state ---------------------------------------------------------------------------------------

STATE_FIELDS = ("keys", "values", "positions", "scores", "seen")


def empty_state(batch: int, kv_heads: int, capacity: int, head_dim: int, value_dim: int, dtype: torch.dtype,
                device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """A cache of ``capacity`` slots (+1 scratch) with nothing in it."""
    slots = capacity + 1
    return {
        "keys": torch.zeros(batch, kv_heads, slots, head_dim, dtype=dtype, device=device),
        "values": torch.zeros(batch, kv_heads, slots, value_dim, dtype=dtype, device=device),
        "positions": torch.full((batch, kv_heads, slots), -1, dtype=torch.long, device=device),
        "scores": torch.zeros(batch, kv_heads, slots, dtype=torch.float32, device=device),
        "seen": torch.zeros(batch, dtype=torch.long, device=device),
    }


def token_validity(mask: torch.Tensor | None, is_causal: bool, batch: int, length: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, T] real keys, [B, T] real queries) of the new tokens, read from the site's own mask.

    A padding key is one no query may attend to; a padding query is one that may attend to nothing.
    """
    if mask is None:
        ones = torch.ones(batch, length, dtype=torch.bool, device=device)
        return ones, ones
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    if is_causal:
        allowed = combined_mask(allowed, True, length, length, torch.float32, device)
    while allowed.dim() < 4:
        allowed = allowed.unsqueeze(0)
    allowed = allowed.expand(batch, allowed.shape[1], length, length)
    return allowed.any(dim=2).any(dim=1), allowed.any(dim=3).any(dim=1)


def new_positions(seen: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """[B, T] index of each new real token among its row's real tokens; -1 for padding."""
    running = seen[:, None] + key_valid.long().cumsum(-1) - 1
    return torch.where(key_valid, running, torch.full_like(running, -1))


def priorities(scores: torch.Tensor, positions: torch.Tensor, seen_after: torch.Tensor, sink: int,
               recent: int) -> torch.Tensor:
    """What each candidate is worth keeping: +inf for sinks and the recent window, -inf for nothing."""
    protected = (positions < sink) | (positions >= seen_after[:, None, None] - recent)
    priority = torch.where(protected, torch.full_like(scores, math.inf), scores)
    return torch.where(positions < 0, torch.full_like(scores, -math.inf), priority)


# --- one step: attend, score, evict and write ----------------------------------------------------------------

def cache_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                              is_causal: bool, scale: float | None, keys: torch.Tensor, values: torch.Tensor,
                              positions: torch.Tensor, observed: torch.Tensor | None
                              ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Attention of the new queries over the valid slots plus the new keys, in fp32.

    Returns (out [B, T, Hq, Dv] sequence-major, mass of each slot [B, Hkv, S], mass of each new key
    [B, Hkv, T]); masses are softmax probabilities summed over the group's query heads and weighted by
    ``observed`` [B, T] (None: masses are not needed and not returned).
    """
    batch, q_heads, length, head_dim = q.shape
    kv_heads = k.shape[1]
    groups = q_heads // kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    qg = q.float().reshape(batch, kv_heads, groups * length, head_dim)
    s_cache = (qg @ keys.float().transpose(-2, -1)) * scale  # [B, Hkv, G*T, S]
    s_cache = s_cache.masked_fill((positions < 0)[:, :, None, :], -math.inf)
    s_new = (qg @ k.float().transpose(-2, -1)) * scale  # [B, Hkv, G*T, T]
    new_mask = combined_mask(mask, is_causal, length, length, torch.float32, q.device)
    if new_mask is not None:
        new_mask = new_mask.expand(batch, q_heads, length, length).reshape(batch, kv_heads, groups * length, length)
        if new_mask.dtype == torch.bool:
            s_new = s_new.masked_fill(~new_mask, -math.inf)
        else:
            s_new = s_new + new_mask.float()
    probs = torch.cat([s_cache, s_new], dim=-1).softmax(dim=-1).nan_to_num(0.0)
    slots = keys.shape[2]
    p_cache, p_new = probs[..., :slots], probs[..., slots:]
    out = p_cache @ values.float() + p_new @ v.float()  # [B, Hkv, G*T, Dv]
    out = out.reshape(batch, q_heads, length, -1).transpose(1, 2).to(q.dtype).contiguous()
    if observed is None:
        return out, None, None
    weights = observed.repeat(1, groups)[:, None, :, None]  # [B, 1, G*T, 1], same (g, t) order as qg
    return out, (p_cache * weights).sum(2), (p_new * weights).sum(2)


def evict_and_write(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, scores: torch.Tensor,
                    new_k: torch.Tensor, new_v: torch.Tensor, new_pos: torch.Tensor, cache_scores: torch.Tensor,
                    new_scores: torch.Tensor, seen_after: torch.Tensor, sink: int, recent: int) -> None:
    """Keep the ``capacity`` best of slots + new tokens, in place: each kept new token overwrites a dropped
    slot; new tokens dropped on arrival go to the scratch slot (and stay invalid there)."""
    batch, kv_heads, slots, _ = keys.shape
    capacity, length = slots - 1, new_k.shape[2]
    new_pos = new_pos[:, None, :].expand(batch, kv_heads, length)
    cand_pos = torch.cat([positions[..., :capacity], new_pos], dim=-1)
    cand_scores = torch.cat([cache_scores[..., :capacity], new_scores], dim=-1)
    priority = priorities(cand_scores, cand_pos, seen_after, sink, recent)
    dropped_index = priority.topk(length, dim=-1, largest=False).indices
    dropped = torch.zeros_like(priority, dtype=torch.bool).scatter_(-1, dropped_index, True)
    freed, kept_new = dropped[..., :capacity], ~dropped[..., capacity:]
    # pair the r-th freed slot with the r-th kept new token (there are as many of each)
    freed_rank = torch.where(freed, freed.long().cumsum(-1) - 1, torch.full_like(freed, length, dtype=torch.long))
    slot_of_rank = torch.full((batch, kv_heads, length + 1), capacity, dtype=torch.long, device=keys.device)
    slot_ids = torch.arange(capacity, device=keys.device).expand(batch, kv_heads, capacity)
    slot_of_rank.scatter_(-1, freed_rank, slot_ids)
    new_rank = (kept_new.long().cumsum(-1) - 1).clamp(min=0)
    target = torch.where(kept_new, slot_of_rank.gather(-1, new_rank), torch.full_like(new_rank, capacity))
    scores.copy_(cache_scores)
    keys.scatter_(2, target[..., None].expand_as(new_k), new_k.to(keys.dtype))
    values.scatter_(2, target[..., None].expand_as(new_v), new_v.to(values.dtype))
    positions.scatter_(2, target, torch.where(kept_new, new_pos, torch.full_like(new_pos, -1)))
    scores.scatter_(2, target, new_scores)
    positions[..., capacity] = -1


def kv_cache_step_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                            is_causal: bool, scale: float | None, keys: torch.Tensor, values: torch.Tensor,
                            positions: torch.Tensor, scores: torch.Tensor, seen: torch.Tensor, policy: str,
                            sink: int, recent: int, window: int, pool: int) -> torch.Tensor:
    """Attend, score and update the cache in place; returns attention out [B, T, Hq, Dv]."""
    rule = POLICIES[policy]
    batch, _, length, _ = q.shape
    key_valid, query_valid = token_validity(mask, is_causal, batch, length, q.device)
    observed = rule.observe(query_valid, window) if rule.uses_attention else None
    out, mass_cache, mass_new = cache_attention_reference(q, k, v, mask, is_causal, scale, keys, values,
                                                          positions, observed)
    step_pos = new_positions(seen, key_valid)
    if mass_cache is None:
        mass_cache, mass_new = torch.zeros_like(scores), scores.new_zeros(batch, k.shape[1], length)
    cache_scores, new_scores = rule.update(scores, mass_cache, mass_new, positions, step_pos[:, None, :]
                                           .expand(batch, k.shape[1], length), pool)
    seen_after = seen + key_valid.long().sum(-1)
    evict_and_write(keys, values, positions, scores, k, v, step_pos, cache_scores, new_scores, seen_after,
                    sink, recent)
    seen.copy_(seen_after)
    return out
