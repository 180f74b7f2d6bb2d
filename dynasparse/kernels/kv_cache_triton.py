"""Triton kernels for one decode step (T == 1) of the bounded KV cache, checked against
``dynasparse.kernels.kv_cache``.

``decode_attention_with_mass``: one program per (batch row, KV head) stacks the group's query heads as tile
rows, so every cache K/V block is read once for the whole group. Online softmax in fp32; a second pass over
the K blocks re-computes q·k with the final row max and sum to write each slot's attention mass (what the
scoring policies read), so the [G, S] probabilities never go to memory. Tiles are widened to fp32 and
multiplied in tf32, which holds fp16/bf16 values exactly (fp32 caches use ieee): decode is memory-bound, so
the wider dot costs little, the probabilities meet V in tf32 rather than bf16, and the interpreter's
unsupported bf16 ``tl.dot`` is never reached.
``evict_and_write_one``: one program per (batch row, KV head) ranks the slots and the new token, picks the
one to drop and writes the new token in place: a single fixed-size write instead of the reference's
topk + cumsum + scatter chain.

The wrappers allocate on the input's device and never check ``is_cuda``: ``TRITON_INTERPRET=1`` runs them
on CPU tensors. Cache tensors are written in place, so their strides are passed, never copied contiguous.
"""
from __future__ import annotations

import math

import torch

from dynasparse.kernels.attention import softmax_scale
import triton
import triton.language as tl

from dynasparse.kernels.kv_cache import new_positions, token_validity
from dynasparse.kernels.policies import POLICIES, step_candidates


# --- attention over the cache + the new token, with each key's attention mass ------------------------------

@triton.jit
def _cache_block_scores(q, keys_row, pos_row, slot, slots, d, row_ok, scale, s_ks, s_kd, s_ps,
                        HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    """Scores of the query rows against one block of slots; -inf where a slot is empty."""
    in_cache = slot < slots
    pos = tl.load(pos_row + slot * s_ps, mask=in_cache, other=-1)
    k = tl.load(keys_row + slot[:, None] * s_ks + d[None, :] * s_kd,
                mask=in_cache[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision=PRECISION) * scale
    return tl.where(row_ok[:, None] & (pos >= 0)[None, :], s, float("-inf"))


@triton.jit
def _decode_attention_mass_kernel(
    q_ptr, kn_ptr, vn_ptr, bias_ptr, keys_ptr, values_ptr, pos_ptr, obs_ptr, o_ptr, mass_ptr, mass_new_ptr,
    slots, groups, kv_heads, scale,
    s_qb, s_qh, s_knb, s_knh, s_vnb, s_vnh, s_kb, s_kh, s_ks, s_kd, s_vb, s_vh, s_vs, s_vd, s_pb, s_ph, s_ps,
    BLOCK_N: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, HAS_MASS: tl.constexpr, PRECISION: tl.constexpr,
):
    bh = tl.program_id(0)
    b = (bh // kv_heads).to(tl.int64)
    kv_h = bh % kv_heads
    q_heads = kv_heads * groups
    r = tl.arange(0, ROWS)  # tile row = query head of the group
    row_ok = r < groups
    head = kv_h * groups + r
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(q_ptr + b * s_qb + head[:, None] * s_qh + d[None, :],
                mask=row_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0).to(tl.float32)
    keys_row = keys_ptr + b * s_kb + kv_h * s_kh
    values_row = values_ptr + b * s_vb + kv_h * s_vh
    pos_row = pos_ptr + b * s_pb + kv_h * s_ph

    # the new key opens the online softmax. Scores stay in natural units (exp, not exp2 of pre-scaled
    # scores): an additive mask at the float minimum would overflow to -inf if scaled by log2(e)
    k_new = tl.load(kn_ptr + b * s_knb + kv_h * s_knh + d, mask=d < HEAD_DIM, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + b * q_heads + head, mask=row_ok, other=float("-inf"))
    s_new = tl.sum(q * k_new[None, :], axis=1) * scale + bias
    m_i = s_new
    l_i = tl.exp(s_new - tl.where(m_i == float("-inf"), 0.0, m_i))
    v_new = tl.load(vn_ptr + b * s_vnb + kv_h * s_vnh + dv, mask=dv < HEAD_DIM_V, other=0.0).to(tl.float32)
    acc = l_i[:, None] * v_new[None, :]

    for start in range(0, slots, BLOCK_N):
        slot = start + tl.arange(0, BLOCK_N)
        s = _cache_block_scores(q, keys_row, pos_row, slot, slots, d, row_ok, scale, s_ks, s_kd, s_ps,
                                HEAD_DIM, PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet stay at zero
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        v = tl.load(values_row + slot[:, None] * s_vs + dv[None, :] * s_vd,
                    mask=(slot < slots)[:, None] & (dv[None, :] < HEAD_DIM_V), other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new

    inv_l = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)  # a row with no allowed key gives 0
    tl.store(o_ptr + (b * q_heads + head[:, None]) * HEAD_DIM_V + dv[None, :],
             (acc * inv_l[:, None]).to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (dv[None, :] < HEAD_DIM_V))

    if HAS_MASS:
        m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
        weight = inv_l * tl.load(obs_ptr + b)  # per row: 1 / softmax sum × the query's observed weight
        tl.store(mass_new_ptr + bh, tl.sum(tl.exp(s_new - m_safe) * weight, axis=0))
        mass_row = mass_ptr + bh.to(tl.int64) * slots
        for start in range(0, slots, BLOCK_N):
            slot = start + tl.arange(0, BLOCK_N)
            s = _cache_block_scores(q, keys_row, pos_row, slot, slots, d, row_ok, scale, s_ks, s_kd, s_ps,
                                    HEAD_DIM, PRECISION)
            p = tl.exp(s - m_safe[:, None]) * weight[:, None]
            tl.store(mass_row + slot, tl.sum(p, axis=0), mask=slot < slots)


def decode_attention_with_mass(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, new_bias: torch.Tensor,
                               keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                               scale: float | None, observed: torch.Tensor | None
                               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``cache_attention_reference`` for one query: q [B, Hq, 1, D] over the valid slots plus the new key
    k_new/v_new [B, Hkv, 1, D*], whose additive mask per query head is ``new_bias`` [B, Hq] (0 for a real
    token, -inf for padding, or the site's additive mask value).

    Returns (out [B, 1, Hq, Dv] in q's dtype, mass of each slot [B, Hkv, S], mass of the new key [B, Hkv, 1]),
    masses weighted by ``observed`` [B]; with ``observed`` None the masses are skipped and returned as None.
    """
    batch, q_heads, length, dim = q.shape
    kv_heads, slots, dim_v = keys.shape[1], keys.shape[2], values.shape[-1]
    if length != 1 or q_heads % kv_heads or dim != keys.shape[-1]:
        raise ValueError("one query per row, query heads a multiple of kv heads and the cache's head dim")
    q, k_new, v_new = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_new, v_new))
    out = q.new_empty(batch, 1, q_heads, dim_v)
    has_mass = observed is not None
    mass = torch.empty(batch, kv_heads, slots, dtype=torch.float32, device=q.device) if has_mass else out
    mass_new = torch.empty(batch, kv_heads, 1, dtype=torch.float32, device=q.device) if has_mass else out
    weights = observed.float().contiguous() if has_mass else out
    scale = softmax_scale(scale, dim)
    groups = q_heads // kv_heads
    _decode_attention_mass_kernel[(batch * kv_heads,)](
        q, k_new, v_new, new_bias.float().contiguous(), keys, values, positions, weights, out, mass,
        mass_new, slots, groups, kv_heads, scale,
        q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        *keys.stride(), *values.stride(), *positions.stride(),
        BLOCK_N=min(64, max(16, triton.next_power_of_2(slots))), ROWS=max(16, triton.next_power_of_2(groups)),
        BLOCK_D=max(16, triton.next_power_of_2(dim)), BLOCK_DV=max(16, triton.next_power_of_2(dim_v)),
        HEAD_DIM=dim, HEAD_DIM_V=dim_v, HAS_MASS=has_mass,
        PRECISION="ieee" if torch.float32 in (q.dtype, keys.dtype, values.dtype) else "tf32")
    return (out, mass, mass_new) if has_mass else (out, None, None)


# --- evict one candidate and write the new token ---------------------------------------------------------

@triton.jit
def _priority(score, pos, recent_from, sink):
    """``kv_cache.priorities``: +inf for sinks and the recent window, -inf for an empty slot or padding."""
    protected = (pos < sink) | (pos >= recent_from)
    return tl.where(pos < 0, float("-inf"), tl.where(protected, float("inf"), score))


@triton.jit
def _evict_write_kernel(
    keys_ptr, values_ptr, pos_ptr, scores_ptr, nk_ptr, nv_ptr, npos_ptr, cs_ptr, ns_ptr, seen_ptr,
    slots, kv_heads, sink, recent,
    s_kb, s_kh, s_ks, s_kd, s_vb, s_vh, s_vs, s_vd, s_pb, s_ph, s_ps, s_sb, s_sh, s_ss,
    s_nkb, s_nkh, s_nkd, s_nvb, s_nvh, s_nvd, s_cb, s_ch, s_cs, s_nsb, s_nsh,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
):
    bh = tl.program_id(0)
    b = (bh // kv_heads).to(tl.int64)
    h = bh % kv_heads
    capacity = slots - 1
    j = tl.arange(0, BLOCK_S)
    in_cache = j < slots
    pos_row = pos_ptr + b * s_pb + h * s_ph
    scores_row = scores_ptr + b * s_sb + h * s_sh
    pos = tl.load(pos_row + j * s_ps, mask=in_cache, other=-1)
    cache_scores = tl.load(cs_ptr + b * s_cb + h * s_ch + j * s_cs, mask=in_cache, other=0.0)
    new_pos = tl.load(npos_ptr + b)
    new_score = tl.load(ns_ptr + b * s_nsb + h * s_nsh)
    recent_from = tl.load(seen_ptr + b) - recent

    # the victim: the lowest priority; ties go to the lowest slot, and the new token is dropped on arrival
    # only when it is strictly lower than every slot (among equals the newest token stays)
    old = tl.where(j < capacity, _priority(cache_scores, pos, recent_from, sink), float("inf"))
    lowest = tl.min(old, axis=0)
    victim = tl.min(tl.where((j < capacity) & (old == lowest), j, BLOCK_S), axis=0)
    drop_new = (_priority(new_score, new_pos, recent_from, sink) < lowest) | (victim >= capacity)
    target = tl.where(drop_new, capacity, victim)  # a dropped new token goes to the scratch slot

    # whole rows are stored once, so no two lanes write the same address
    written = tl.where(drop_new, -1, new_pos)
    tl.store(pos_row + j * s_ps, tl.where(j == target, written, tl.where(j == capacity, -1, pos)), mask=in_cache)
    tl.store(scores_row + j * s_ss, tl.where(j == target, new_score, cache_scores), mask=in_cache)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    k_new = tl.load(nk_ptr + b * s_nkb + h * s_nkh + d * s_nkd, mask=d < HEAD_DIM)
    v_new = tl.load(nv_ptr + b * s_nvb + h * s_nvh + dv * s_nvd, mask=dv < HEAD_DIM_V)
    tl.store(keys_ptr + b * s_kb + h * s_kh + target * s_ks + d * s_kd, k_new.to(keys_ptr.dtype.element_ty),
             mask=d < HEAD_DIM)
    tl.store(values_ptr + b * s_vb + h * s_vh + target * s_vs + dv * s_vd, v_new.to(values_ptr.dtype.element_ty),
             mask=dv < HEAD_DIM_V)


def evict_and_write_one(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, scores: torch.Tensor,
                        new_k: torch.Tensor, new_v: torch.Tensor, new_pos: torch.Tensor,
                        cache_scores: torch.Tensor, new_score: torch.Tensor, seen_after: torch.Tensor, sink: int,
                        recent: int) -> None:
    """``kv_cache.evict_and_write`` for one new token (new_k/new_v [B, Hkv, 1, D*], new_pos [B] or [B, 1],
    new_score [B, Hkv, 1]), in place; ``scores`` takes ``cache_scores`` for every slot it keeps.

    Same contents as the reference; only the slot chosen among equal priorities may differ (see the kernel).
    """
    batch, kv_heads, slots, dim = keys.shape
    dim_v = values.shape[-1]
    new_pos = new_pos.reshape(batch).contiguous()
    new_score = new_score.reshape(batch, kv_heads).float()
    _evict_write_kernel[(batch * kv_heads,)](
        keys, values, positions, scores, new_k, new_v, new_pos, cache_scores, new_score,
        seen_after.contiguous(), slots, kv_heads, sink, recent,
        *keys.stride(), *values.stride(), *positions.stride(), *scores.stride(),
        new_k.stride(0), new_k.stride(1), new_k.stride(3), new_v.stride(0), new_v.stride(1), new_v.stride(3),
        *cache_scores.stride(), *new_score.stride(),
        BLOCK_S=triton.next_power_of_2(slots), BLOCK_D=triton.next_power_of_2(dim),
        BLOCK_DV=triton.next_power_of_2(dim_v), HEAD_DIM=dim, HEAD_DIM_V=dim_v)


# --- the decode step ---------------------------------------------------------------------------------------

def _new_key_bias(mask: torch.Tensor | None, batch: int, q_heads: int, device: torch.device) -> torch.Tensor:
    """[B, Hq] additive mask of the one new key for each query head (with one query, causality allows it)."""
    if mask is None:
        return torch.zeros(batch, q_heads, device=device)
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    mask = mask.expand(batch, q_heads, 1, 1)[..., 0, 0]
    if mask.dtype == torch.bool:
        return torch.zeros(batch, q_heads, device=device).masked_fill(~mask, -math.inf)
    return mask.float()


def kv_cache_decode_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                         is_causal: bool, scale: float | None, keys: torch.Tensor, values: torch.Tensor,
                         positions: torch.Tensor, scores: torch.Tensor, seen: torch.Tensor, policy: str,
                         sink: int, recent: int) -> torch.Tensor:
    """``kv_cache_step_reference`` for T == 1: attend (+ masses), the policy's O(S) torch update, evict and
    write; the cache is updated in place, returns out [B, 1, Hq, Dv].

    With one query the observation window (any window >= 1) is that query and SnapKV's pooling is a no-op,
    so ``window`` and ``pool`` are not needed. The kernel sums the group's masses: a policy that pools them
    another way (``reduce="max"``) runs ``kv_cache_step``.
    """
    rule = POLICIES[policy]
    if rule.uses_attention and rule.reduce != "sum":
        raise ValueError(f"the Triton decode step sums attention masses; policy {policy!r} takes their "
                         f"{rule.reduce}: run kv_cache_step")
    batch, q_heads = q.shape[:2]
    kv_heads = k.shape[1]
    key_valid, query_valid = token_validity(mask, is_causal, batch, 1, q.device)
    observed = rule.observe(query_valid, 1)
    out, mass_cache, mass_new = decode_attention_with_mass(q, k, v, _new_key_bias(mask, batch, q_heads, q.device),
                                                           keys, values, positions, scale,
                                                           observed[:, 0] if rule.uses_attention else None)
    step_pos = new_positions(seen, key_valid)  # [B, 1]
    masses = None if mass_cache is None else (mass_cache, mass_new)
    cache_scores, new_scores = rule.update(step_candidates((keys, values, positions, scores), keys.shape[2], (q, k, v),
                                                           step_pos, masses, observed, scale, 1))
    seen_after = seen + key_valid.long().sum(-1)
    evict_and_write_one(keys, values, positions, scores, k, v, step_pos, cache_scores, new_scores, seen_after,
                        sink, recent)
    seen.copy_(seen_after)
    return out
