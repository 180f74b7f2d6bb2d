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
infinite priority; empty slots and padding have none. Attention is permutation invariant over keys, so
eviction never moves data it keeps.

Slot order is free, and one rule fixes it: kept new tokens take free slots in slot order. A cache that
has not evicted yet therefore holds its row's tokens in slots ``0 .. seen - 1``, slot index == position.
``kv_cache_step`` (what runs) relies on that: until a row must evict, a step appends and attends with one
fused SDPA call over the filled slots; only steps that evict take the scoring path of the reference.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dynasparse.kernels.attention import attention_sdpa, causal_mask, combined_mask, softmax_scale
from dynasparse.kernels.policies import POLICIES, Policy, step_candidates
from dynasparse.kernels.prompt_phase import masses_skipped


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


def allowed_new(mask: torch.Tensor | None, is_causal: bool, batch: int, length: int,
                device: torch.device) -> torch.Tensor | None:
    """[B, H', T, T] bool: which new key each new query may attend to (H' is 1 or Hq); None: all of them."""
    if mask is None and not is_causal:
        return None
    if mask is None:
        allowed = causal_mask(length, length, device)
    else:
        allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        if is_causal:
            allowed = combined_mask(allowed, True, length, length, torch.float32, device)
    while allowed.dim() < 4:
        allowed = allowed.unsqueeze(0)
    return allowed.expand(batch, allowed.shape[1], length, length)


def token_validity(mask: torch.Tensor | None, is_causal: bool, batch: int, length: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, T] real keys, [B, T] real queries) of the new tokens, read from the site's own mask.

    A padding key is one no query may attend to; a padding query is one that may attend to nothing.
    """
    allowed = allowed_new(None if mask is None else mask, is_causal and mask is not None, batch, length, device)
    if allowed is None:
        ones = torch.ones(batch, length, dtype=torch.bool, device=device)
        return ones, ones
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
                              positions: torch.Tensor, observed: torch.Tensor | None, rule: Policy = POLICIES["h2o"],
                              more: tuple[torch.Tensor, torch.Tensor] | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Attention of the new queries over the valid slots plus the new keys, in fp32.

    Returns (out [B, T, Hq, Dv] sequence-major, mass of each slot [B, Hkv, S], mass of each new key
    [B, Hkv, T]); masses are softmax probabilities weighted by ``observed`` [B, T] and pooled over the
    group's query heads and the queries as ``rule`` pools them (None: masses are not needed and not returned).
    ``more``: attention already computed over older tokens kept elsewhere (a compressed tier's blocks), as
    (out [B, Hkv, G*T, Dv] normalised over them, lse [B, Hkv, G*T] its log-normaliser, -inf: none seen). It
    joins the softmax as one key whose logit is ``lse`` and whose value is ``out``, which is exactly attention
    over all of them together; those tokens get no mass.
    """
    batch, q_heads, length, head_dim = q.shape
    kv_heads = k.shape[1]
    groups = q_heads // kv_heads
    scale = softmax_scale(scale, head_dim)
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
    s_more = [] if more is None else [more[1][..., None]]
    probs = torch.cat([s_cache, *s_more, s_new], dim=-1).softmax(dim=-1).nan_to_num(0.0)
    slots = keys.shape[2]
    p_cache, p_new = probs[..., :slots], probs[..., probs.shape[-1] - length:]
    out = p_cache @ values.float() + p_new @ v.float()  # [B, Hkv, G*T, Dv]
    if more is not None:
        out = out + probs[..., slots:slots + 1] * more[0]
    out = out.reshape(batch, q_heads, length, -1).transpose(1, 2).to(q.dtype).contiguous()
    if observed is None:
        return out, None, None
    weights = observed.repeat(1, groups)[:, None, :, None]  # [B, 1, G*T, 1], same (g, t) order as qg
    return out, rule.masses(p_cache, weights), rule.masses(p_new, weights)


def _placement(positions: torch.Tensor, new_pos: torch.Tensor, cache_scores: torch.Tensor,
               new_scores: torch.Tensor, seen_after: torch.Tensor, sink: int, recent: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which slots + new tokens the cache keeps: (dropped slots [B, Hkv, capacity], the slot each new token
    goes to [B, Hkv, T] (the scratch slot when it is dropped on arrival), its position there [B, Hkv, T]).

    Per (row, KV head), the real candidates beyond ``capacity`` (the excess) are dropped, lowest priority
    first (among equals the slot goes and the newest token stays). Kept new tokens then take the free slots
    (empty or dropped) in slot order.
    """
    batch, kv_heads, slots = positions.shape
    capacity, length = slots - 1, new_pos.shape[-1]
    new_pos = new_pos[:, None, :].expand(batch, kv_heads, length)
    cand_pos = torch.cat([positions[..., :capacity], new_pos], dim=-1)
    real = cand_pos >= 0
    priority = priorities(torch.cat([cache_scores[..., :capacity], new_scores], dim=-1), cand_pos, seen_after,
                          sink, recent).masked_fill(~real, math.inf)
    excess = (real.sum(-1, keepdim=True) - capacity).clamp(min=0)
    rank = priority.sort(dim=-1, stable=True).indices.argsort(dim=-1)  # rank of each candidate, ties in order
    dropped = real & (rank < excess)
    free = ~real[..., :capacity] | dropped[..., :capacity]
    kept_new = real[..., capacity:] & ~dropped[..., capacity:]
    # pair the r-th free slot with the r-th kept new token
    free_rank = torch.where(free, free.long().cumsum(-1) - 1, torch.full_like(free, capacity, dtype=torch.long))
    slot_ids = torch.arange(capacity, device=positions.device).expand(batch, kv_heads, capacity)
    slot_of_rank = torch.full((batch, kv_heads, capacity + 1), capacity, dtype=torch.long,
                              device=positions.device).scatter(-1, free_rank, slot_ids)
    new_rank = (kept_new.long().cumsum(-1) - 1).clamp(min=0)
    target = torch.where(kept_new, slot_of_rank.gather(-1, new_rank), torch.full_like(new_rank, capacity))
    return dropped[..., :capacity], target, torch.where(kept_new, new_pos, torch.full_like(new_pos, -1))


def evicted(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, new_k: torch.Tensor,
            new_v: torch.Tensor, new_pos: torch.Tensor, cache_scores: torch.Tensor, new_scores: torch.Tensor,
            seen_after: torch.Tensor, sink: int, recent: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The cache (keys, values, positions, scores) after ``_placement``, out of place: what the ONNX export
    traces. ``evict_and_write`` is the same update in place."""
    dropped, target, written = _placement(positions, new_pos, cache_scores, new_scores, seen_after, sink, recent)
    scratch = positions.new_full((*positions.shape[:2], 1), -1)
    held = torch.cat([positions[..., :-1].masked_fill(dropped, -1), scratch], dim=-1)
    keys = keys.scatter(2, target[..., None].expand_as(new_k), new_k.to(keys.dtype))
    values = values.scatter(2, target[..., None].expand_as(new_v), new_v.to(values.dtype))
    positions = held.scatter(2, target, written)
    scores = cache_scores.scatter(2, target, new_scores)
    return keys, values, torch.cat([positions[..., :-1], scratch], dim=-1), scores


def evict_and_write(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, scores: torch.Tensor,
                    new_k: torch.Tensor, new_v: torch.Tensor, new_pos: torch.Tensor, cache_scores: torch.Tensor,
                    new_scores: torch.Tensor, seen_after: torch.Tensor, sink: int, recent: int) -> None:
    """``evicted`` written into the cache in place: only the chosen slots are touched, no copy of the cache
    (the runtime's path, every query-aware decode step included)."""
    dropped, target, written = _placement(positions, new_pos, cache_scores, new_scores, seen_after, sink, recent)
    positions[..., :-1].masked_fill_(dropped, -1)
    scores.copy_(cache_scores)
    keys.scatter_(2, target[..., None].expand_as(new_k), new_k.to(keys.dtype))
    values.scatter_(2, target[..., None].expand_as(new_v), new_v.to(values.dtype))
    positions.scatter_(2, target, written)
    scores.scatter_(2, target, new_scores)
    positions[..., -1] = -1


def score_and_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    positions: torch.Tensor, scores: torch.Tensor, seen: torch.Tensor, key_valid: torch.Tensor,
                    rule: Policy, masses: torch.Tensor | None, observed: torch.Tensor, held: int, sink: int,
                    recent: int, scale: float | None, pool: int) -> None:
    """The policy's update from the ``masses`` [B, Hkv, held + T] of what the step read (None: no masses)
    and the ``observed`` [B, T] queries, then eviction and the write of the new tokens, as in the dense step."""
    if masses is not None:
        mass_cache = torch.zeros_like(scores)
        mass_cache[..., :held], masses = masses[..., :held], (mass_cache, masses[..., held:])
    step_pos = new_positions(seen, key_valid)
    cache_scores, new_scores = rule.update(step_candidates((keys, values, positions, scores), keys.shape[2], (q, k, v),
                                                           step_pos, masses, observed, scale, pool))
    seen_after = seen + key_valid.long().sum(-1)
    evict_and_write(keys, values, positions, scores, k, v, step_pos, cache_scores, new_scores, seen_after, sink,
                    recent)
    seen.copy_(seen_after)


def _attend_and_score(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      is_causal: bool, scale: float | None, keys: torch.Tensor, values: torch.Tensor,
                      positions: torch.Tensor, scores: torch.Tensor, seen: torch.Tensor, policy: str, window: int,
                      pool: int) -> tuple[torch.Tensor, ...]:
    """(attention out [B, T, Hq, Dv], new tokens' positions, slot scores, new scores, seen after the step)."""
    rule = POLICIES[policy]
    batch, _, length, _ = q.shape
    key_valid, query_valid = token_validity(mask, is_causal, batch, length, q.device)
    observed = rule.observe(query_valid, window)
    out, mass_cache, mass_new = cache_attention_reference(q, k, v, mask, is_causal, scale, keys, values,
                                                          positions, observed if rule.uses_attention else None, rule)
    step_pos = new_positions(seen, key_valid)
    masses = None if mass_cache is None else (mass_cache, mass_new)
    cache_scores, new_scores = rule.update(step_candidates((keys, values, positions, scores), keys.shape[2], (q, k, v),
                                                           step_pos, masses, observed, scale, pool))
    return out, step_pos, cache_scores, new_scores, seen + key_valid.long().sum(-1)


def kv_cache_step_functional(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                             is_causal: bool, scale: float | None, keys: torch.Tensor, values: torch.Tensor,
                             positions: torch.Tensor, scores: torch.Tensor, seen: torch.Tensor, policy: str,
                             sink: int, recent: int, window: int, pool: int) -> tuple[torch.Tensor, ...]:
    """Attend, score and evict: (attention out [B, T, Hq, Dv], keys, values, positions, scores, seen) with the
    cache updated out of place: what the ONNX export traces (nothing here depends on the step length, so one
    graph serves prefill and decode). ``kv_cache_step_reference`` is the same step in place."""
    out, step_pos, cache_scores, new_scores, seen_after = _attend_and_score(
        q, k, v, mask, is_causal, scale, keys, values, positions, scores, seen, policy, window, pool)
    state = evicted(keys, values, positions, k, v, step_pos, cache_scores, new_scores, seen_after, sink, recent)
    return (out, *state, seen_after)


def kv_cache_step_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                            is_causal: bool, scale: float | None, keys: torch.Tensor, values: torch.Tensor,
                            positions: torch.Tensor, scores: torch.Tensor, seen: torch.Tensor, policy: str,
                            sink: int, recent: int, window: int, pool: int) -> torch.Tensor:
    """Attend, score and update the cache in place; returns attention out [B, T, Hq, Dv]."""
    out, step_pos, cache_scores, new_scores, seen_after = _attend_and_score(
        q, k, v, mask, is_causal, scale, keys, values, positions, scores, seen, policy, window, pool)
    evict_and_write(keys, values, positions, scores, k, v, step_pos, cache_scores, new_scores, seen_after,
                    sink, recent)
    seen.copy_(seen_after)
    return out


# --- the step that runs: append with fused attention until a row must evict ------------------------------------

def _slot_mask(allowed: torch.Tensor | None, positions: torch.Tensor, seen: torch.Tensor, key_valid: torch.Tensor,
               step_pos: torch.Tensor, filled: int, q_heads: int) -> torch.Tensor:
    """[B, Hq, T, filled] bool over the slots of an appending cache: every query sees the row's older
    cached tokens and the new tokens its own mask allows, which sit at their positions."""
    batch, length = key_valid.shape
    if allowed is None:
        allowed = torch.ones(batch, 1, length, length, dtype=torch.bool, device=seen.device)
    held = positions[:, :, :filled]
    cached = ((held >= 0) & (held < seen[:, None, None]))[:, :, None, :]  # [B, Hkv, 1, filled]
    cached = cached.repeat_interleave(q_heads // positions.shape[1], dim=1)
    at = torch.where(key_valid, step_pos, filled)[:, None, None, :].expand(*allowed.shape)
    new = torch.zeros(*allowed.shape[:3], filled + 1, dtype=torch.bool, device=seen.device)
    return new.scatter_(-1, at, allowed)[..., :filled] | cached


def _no_holes(positions: torch.Tensor, count: int) -> bool:
    """True when the first ``count`` slots all hold a token (no eviction or rollback has emptied one)."""
    return count == 0 or bool((positions[..., :count] >= 0).all())


def _slot_masses(q: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor | None, scale: float | None,
                 observed: torch.Tensor, rule: Policy) -> torch.Tensor:
    """[B, Hkv, filled]: softmax mass each slot gets from the ``observed`` [B, T] queries, pooled over them
    and the group's query heads as ``rule`` pools them."""
    batch, q_heads, length, head_dim = q.shape
    kv_heads = keys.shape[1]
    groups = q_heads // kv_heads
    scale = softmax_scale(scale, head_dim)
    logits = (q.float().reshape(batch, kv_heads, groups * length, head_dim) @ keys.float().transpose(-2, -1)) * scale
    if visible is not None:
        visible = visible.expand(batch, q_heads, length, visible.shape[-1])
        logits = logits.masked_fill(~visible.reshape(batch, kv_heads, groups * length, -1), -math.inf)
    weights = observed.repeat(1, groups)[:, None, :, None]
    return rule.masses(logits.softmax(-1).nan_to_num(0.0), weights)


def _plain_causal(mask: torch.Tensor | None, is_causal: bool, batch: int, length: int, device: torch.device) -> bool:
    """True when the site's mask over the new tokens is plain causal attention: no padding, nothing else."""
    if length == 1:  # one query, one key: causal either way
        return mask is None or bool((mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2).all())
    allowed = allowed_new(mask, is_causal, batch, length, device)
    return allowed is not None and bool((allowed == causal_mask(length, length, device)).all())


# Up to this many new tokens (a verify pass, a short chunk), one masked SDPA call costs less on CPU than
# ``_cached_then_causal``'s two flash calls and their merge (about half the ops; 1.5x faster at 2-16 tokens
# over 300 cached ones); from about 64 on, skipping the causal half pays for the merge.
SHORT_CHUNK = 32


def _cached_then_causal(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk's attention over older cached tokens (no mask: each is before every query) and over itself
    (causal), as two flash calls merged by their log-sum-exp: the causal half is skipped, not masked.
    Returns (out [B, Hq, T, Dv], each query's log-sum-exp of its logits [B, Hq, T] in fp32)."""
    batch, q_heads, length, head_dim = q.shape
    kv_heads = k.shape[1]
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    grouped = q.reshape(batch, kv_heads, q_heads // kv_heads * length, head_dim)  # a group's queries share K/V
    out_cached, lse_cached = flash(grouped, keys, values, 0.0, False, scale=scale)
    groups = q_heads // kv_heads
    out_new, lse_new = flash(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), 0.0, True,
                             scale=scale)
    lse_cached = lse_cached.reshape(batch, q_heads, length, 1)
    top = torch.maximum(lse_cached, lse_new[..., None])
    w_cached, w_new = (lse_cached - top).exp(), (lse_new[..., None] - top).exp()
    out = out_cached.reshape(batch, q_heads, length, -1).float() * w_cached + out_new.float() * w_new
    total = w_cached + w_new
    return (out / total).to(q.dtype), (top + total.log())[..., 0]


def _masses_by_lse(q: torch.Tensor, keys: torch.Tensor, lse: torch.Tensor, scale: float | None, reduce: str,
                   rows: int = 128) -> torch.Tensor:
    """[B, Hkv, N]: the mass ``keys`` [B, Hkv, N, D] get from every query of ``q`` [B, Hq, T, D], pooled by
    ``reduce`` ("max" or "sum") over the queries and the group's heads, as ``_slot_masses`` with all
    queries observed. The queries are the last T tokens and attend causally (bottom-right aligned).

    ``lse`` [B, Hq, T] is each query's softmax log-normaliser, which the attention call already gave, so a
    probability is exp(logit - lse): no softmax is recomputed, and a max pools before its exp. Query rows
    go ``rows`` at a time so the logits stay in cache (KVzip's re-read pays this for every prompt token)."""
    batch, q_heads, length, head_dim = q.shape
    kv_heads, count = keys.shape[1], keys.shape[2]
    groups = q_heads // kv_heads
    qg = q.float().reshape(batch * kv_heads, groups * length, head_dim)
    neg_lse = -lse.float().reshape(batch * kv_heads, groups * length, 1)
    keys_t = keys.float().reshape(batch * kv_heads, count, head_dim).transpose(1, 2)
    later = ~causal_mask(length, length, q.device).repeat(groups, 1)  # [G*T, T]: a query's later new tokens
    pooled = None
    for start in range(0, groups * length, rows):
        logits = torch.baddbmm(neg_lse[:, start:start + rows], qg[:, start:start + rows], keys_t,
                               alpha=softmax_scale(scale, head_dim))
        logits[..., count - length:].masked_fill_(later[start:start + rows], -math.inf)
        part = logits.amax(1) if reduce == "max" else logits.exp().sum(1)
        pooled = part if pooled is None else torch.maximum(pooled, part) if reduce == "max" else pooled + part
    return (pooled.exp() if reduce == "max" else pooled).reshape(batch, kv_heads, count)


def _append_alike(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
                  scale: float | None, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                  scores: torch.Tensor, seen: torch.Tensor, rule: Policy, filled: int, window: int, pool: int
                  ) -> torch.Tensor:
    """Every row holds ``filled`` tokens and takes T real tokens with causal attention: the tokens go to
    slots ``filled .. filled + T - 1`` and attention is one SDPA call (the site's own call into an empty
    cache, so a single prefill chunk computes exactly what the uncached model computes). Scores stay
    current (only the observed queries' masses are computed), so the cache can evict on any later step
    or all at once after the prompt (``KVCache.compress``)."""
    batch, _, length, _ = q.shape
    end = filled + length
    keys[:, :, filled:end] = k
    values[:, :, filled:end] = v
    if length == 1:
        positions[:, :, filled] = filled
    else:
        positions[:, :, filled:end] = torch.arange(filled, end, device=q.device)
    visible = None if length == 1 else causal_mask(length, end, q.device)
    lse = None
    if filled == 0:
        out = attention_sdpa(q, k, v, mask, is_causal, scale)
    elif length > SHORT_CHUNK and q.device.type == "cpu":
        out, lse = _cached_then_causal(q, keys[:, :, :filled], values[:, :, :filled], k, v, scale)
    else:
        out = attention_sdpa(q, keys[:, :, :end], values[:, :, :end], visible, False, scale)
    tail = rule.observed_tail(length, window)
    if not rule.uses_attention or masses_skipped():
        masses = scores.new_zeros(batch, k.shape[1], end)
    elif lse is not None and rule.reduce in ("max", "sum"):
        masses = _masses_by_lse(q[:, :, length - tail:], keys[:, :, :end], lse[..., length - tail:], scale,
                                rule.reduce)
    else:
        masses = _slot_masses(q[:, :, length - tail:], keys[:, :, :end], None if visible is None else
                              visible[length - tail:], scale, q.new_ones(batch, tail, dtype=torch.float32), rule)
    observed = (torch.arange(length, device=q.device) >= length - tail).float().expand(batch, length)
    cache_scores, new_scores = rule.update(step_candidates(
        (keys, values, positions, scores), filled, (q, k, v), positions[..., filled:end],
        (masses[..., :filled], masses[..., filled:]), observed, scale, pool))
    scores[..., :filled] = cache_scores
    scores[..., filled:end] = new_scores
    seen.add_(length)
    return out.transpose(1, 2).contiguous()


def _append_packed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, keys: torch.Tensor,
                   values: torch.Tensor, positions: torch.Tensor, scores: torch.Tensor, seen: torch.Tensor,
                   rule: Policy, window: int, pool: int, high: int) -> torch.Tensor:
    """Rows of different lengths, each packed from slot 0 (slot == position, as self-speculative rounds
    leave them), take T real tokens with causal attention: row b's go to slots ``seen[b] ..``, and query i
    sees its row's slots up to ``seen[b] + i``: the general path without its padding and hole bookkeeping."""
    batch, q_heads, length, _ = q.shape
    step_pos = seen[:, None] + torch.arange(length, device=q.device)  # [B, T]
    target = step_pos[:, None, :].expand(batch, k.shape[1], length)
    keys.scatter_(2, target[..., None].expand_as(k), k.to(keys.dtype))
    values.scatter_(2, target[..., None].expand_as(v), v.to(values.dtype))
    positions.scatter_(2, target, target)
    filled = high + length
    visible = (torch.arange(filled, device=q.device) <= step_pos[:, None, :, None]).expand(
        batch, q_heads, length, filled)
    out = attention_sdpa(q, keys[:, :, :filled], values[:, :, :filled], visible, False, scale)
    observed = rule.observe(torch.ones(batch, length, dtype=torch.bool, device=q.device), window)
    masses = None
    if rule.uses_attention and not masses_skipped():
        slot_masses = _slot_masses(q, keys[:, :, :filled], visible, scale, observed, rule)
        fresh = torch.arange(filled, device=q.device) >= seen[:, None, None]
        masses = slot_masses.masked_fill(fresh, 0.0), slot_masses.gather(-1, target)
    cache_scores, new_scores = rule.update(step_candidates(
        (keys, values, positions, scores), filled, (q, k, v), step_pos, masses, observed, scale, pool))
    scores[..., :filled] = cache_scores
    scores.scatter_(2, target, new_scores)
    seen.add_(length)
    return out.transpose(1, 2).contiguous()


def _packed(positions: torch.Tensor, seen: torch.Tensor, high: int) -> bool:
    """True when each row's cached tokens fill its first ``seen`` slots, and only those (of the first ``high``)."""
    held = positions[..., :high] >= 0
    return bool((held == (torch.arange(high, device=seen.device) < seen[:, None, None])).all())


def _evict_one_alike(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, keys: torch.Tensor,
                     values: torch.Tensor, positions: torch.Tensor, scores: torch.Tensor, seen: torch.Tensor,
                     rule: Policy, sink: int, recent: int) -> torch.Tensor:
    """One real token into caches that are all full: attend in fp32 (masses included), then the lowest
    candidate leaves (among equals the slot, lowest first, and the new token stays), as ``evict_and_write``."""
    batch, q_heads, _, head_dim = q.shape
    kv_heads, slots = keys.shape[1], keys.shape[2]
    capacity = slots - 1
    scale = softmax_scale(scale, head_dim)
    qg = q.float().reshape(batch, kv_heads, q_heads // kv_heads, head_dim)
    logits = torch.cat([qg @ keys[:, :, :capacity].float().transpose(-2, -1), qg @ k.float().transpose(-2, -1)], -1)
    probs = (logits * scale).softmax(-1)  # [B, Hkv, G, capacity + 1]: the slots, then the new token
    out = probs[..., :capacity] @ values[:, :, :capacity].float() + probs[..., capacity:] @ v.float()
    out = out.reshape(batch, q_heads, 1, -1).to(q.dtype)
    mass = rule.masses(probs, 1.0)
    step_pos = seen[:, None, None].expand(batch, kv_heads, 1)
    cache_scores, new_score = rule.update(step_candidates(
        (keys, values, positions, scores), capacity, (q, k, v), step_pos, (mass[..., :capacity], mass[..., capacity:]),
        q.new_ones(batch, 1, dtype=torch.float32), scale, 1))
    seen_after = seen + 1
    priority = priorities(cache_scores, positions[..., :capacity], seen_after, sink, recent)
    lowest, victim = priority.min(-1, keepdim=True)
    keep = priorities(new_score, step_pos, seen_after, sink, recent) >= lowest
    target = torch.where(keep, victim, capacity)
    scores[..., :capacity] = cache_scores
    keys.scatter_(2, target[..., None].expand_as(k), k.to(keys.dtype))
    values.scatter_(2, target[..., None].expand_as(v), v.to(values.dtype))
    positions.scatter_(2, target, torch.where(keep, step_pos, -1))
    scores.scatter_(2, target, new_score)
    positions[..., capacity] = -1
    seen.copy_(seen_after)
    return out.transpose(1, 2).contiguous()


def kv_cache_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
                  scale: float | None, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                  scores: torch.Tensor, seen: torch.Tensor, policy: str, sink: int, recent: int, window: int,
                  pool: int) -> torch.Tensor:
    """``kv_cache_step_reference``, fast. Reads ``seen`` on the host to pick a path:

    * rows alike (same length, no padding, causal) and no emptied slot: an append is slice writes and one
      SDPA call; a decode step into full caches is ``_evict_one_alike``;
    * rows of different lengths, each packed from slot 0, no padding, causal, room for the step: an append
      is ``_append_packed``;
    * otherwise, while no row has to evict: append at slot == position, one SDPA call with a slot mask
      (slots emptied by a rollback or a shrink stay out of it);
    * steps that evict otherwise: the reference.
    """
    rule = POLICIES[policy]
    batch, _, length, _ = q.shape
    capacity = keys.shape[2] - 1
    lengths = seen.tolist()
    low, high = min(lengths), max(lengths)
    if low == high and _plain_causal(mask, is_causal, batch, length, q.device):
        if high + length <= capacity and _no_holes(positions, high):
            return _append_alike(q, k, v, mask, is_causal, scale, keys, values, positions, scores, seen, rule, high,
                                 window, pool)
        if length == 1 and high >= capacity and _no_holes(positions, capacity):
            return _evict_one_alike(q, k, v, scale, keys, values, positions, scores, seen, rule, sink, recent)
    elif high + length <= capacity and _plain_causal(mask, is_causal, batch, length, q.device) \
            and _packed(positions, seen, high):
        return _append_packed(q, k, v, scale, keys, values, positions, scores, seen, rule, window, pool, high)
    allowed = allowed_new(mask, is_causal, batch, length, q.device)
    if allowed is None:
        key_valid = query_valid = torch.ones(batch, length, dtype=torch.bool, device=q.device)
    else:
        key_valid, query_valid = allowed.any(dim=2).any(dim=1), allowed.any(dim=3).any(dim=1)
    seen_after = seen + key_valid.long().sum(-1)
    filled = int(seen_after.max())
    if filled > capacity:
        return kv_cache_step_reference(q, k, v, mask, is_causal, scale, keys, values, positions, scores, seen,
                                       policy, sink, recent, window, pool)
    step_pos = new_positions(seen, key_valid)
    at = torch.where(key_valid, step_pos, capacity)  # padding goes to the scratch slot
    target = at[:, None, :].expand(batch, k.shape[1], length)
    keys.scatter_(2, target[..., None].expand_as(k), k.to(keys.dtype))
    values.scatter_(2, target[..., None].expand_as(v), v.to(values.dtype))
    positions.scatter_(2, target, step_pos[:, None, :].expand_as(target))
    positions[..., capacity] = -1
    if high == 0:  # nothing was cached: exactly the site's own attention over the new tokens
        out, visible, slot_keys = attention_sdpa(q, k, v, mask, is_causal, scale), allowed, k
    else:
        visible = _slot_mask(allowed, positions, seen, key_valid, step_pos, filled, q.shape[1])
        slot_keys = keys[:, :, :filled]
        out = attention_sdpa(q, slot_keys, values[:, :, :filled], visible, False, scale)
        out = out * visible.any(-1, keepdim=True).to(out.dtype)  # a query that sees nothing gives 0
    observed = rule.observe(query_valid, window)
    if rule.uses_attention and not masses_skipped():
        masses = _slot_masses(q, slot_keys, visible, scale, observed, rule)
        where = torch.where(key_valid, step_pos, filled)[:, None, :].expand_as(target)
        if high == 0:  # the masses are the new keys', in token order
            mass_new, mass_cache = masses, masses.new_zeros(*masses.shape[:2], filled)
        else:  # by slot: the new keys' sit at their positions, padding reads a zero
            mass_new = F.pad(masses, (0, 1)).gather(-1, where)
            fresh = torch.arange(filled, device=q.device) >= seen[:, None, None]
            mass_cache = masses.masked_fill(fresh, 0.0)
    else:
        mass_cache = mass_new = None
    cache_scores, new_scores = rule.update(step_candidates(
        (keys, values, positions, scores), filled, (q, k, v), step_pos,
        None if mass_cache is None else (mass_cache, mass_new), observed, scale, pool))
    scores[..., :filled] = cache_scores
    scores.scatter_(2, target, new_scores)
    seen.copy_(seen_after)
    return out.transpose(1, 2).contiguous()
