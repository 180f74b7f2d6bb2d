"""Sparse prefill over a bounded cache: block-sparse attention and KV eviction composed in one step.

The long-context recipe: the prompt is read through a block-sparse plan (MInference / FlexPrefill) and the
cache stays bounded (SnapKV / H2O). A chunk whose keys, the cached tokens plus the chunk, reach
``min_seq_len`` attends through a block plan over the cached tokens followed by the chunk: every cached
token precedes the chunk, so the plan's bottom-right causal alignment holds however eviction has shuffled
the slots. Decode and verify steps (fewer new tokens than a block) read the keys their queries weigh
most with ``decode_keep`` < 1 (``dynasparse.kernels.query_aware``), every key otherwise; they, and chunks of
rows that are all shorter, run the dense cache step (``kv_cache.kv_cache_step``) when they read everything.

Score-based policies take their masses from the sparse computation: a key in a kept block contributes its
softmax probability, normalised over the kept keys exactly as the attention was; a key in a skipped block
contributes nothing for that query (it was not read). Eviction then runs as in the dense step. KVzip's re-read
of the prompt is the exception: it reads every key (``prompt_phase``).
"""
from __future__ import annotations


import torch

from dynasparse.kernels.attention import causal_mask, softmax_scale
from dynasparse.kernels.kv_cache import (_slot_masses, allowed_new, kv_cache_step, score_and_write,
                                         token_validity)
from dynasparse.kernels.policies import POLICIES
from dynasparse.kernels.prompt_phase import masses_skipped, rereading
from dynasparse.kernels.query_aware import query_aware_attention
from dynasparse.kernels.sparse_attention import build_plan, plan_token_mask, sparse_attention_gather


def _held_slots(positions: torch.Tensor) -> int:
    """Slots up to the last one that holds a token in any row or head (the rest are empty everywhere)."""
    held = (positions[..., :-1] >= 0).flatten(0, 1).any(0).nonzero()
    return 0 if held.numel() == 0 else int(held.max()) + 1


def _round_up(n: int, block_size: int) -> int:
    return -(-n // block_size) * block_size


def _right_aligned(real: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (row, KV head), where each key of a right-aligned layout comes from: the real candidates of
    ``real`` [B, Hkv, N] (cached slots, then the chunk), in order, ending at the last key of a grid of whole
    blocks. Blocks then count back from the newest token, so a row's plan does not depend on the other rows
    of its batch or on its padding. Returns (source index [B, Hkv, L], real [B, Hkv, L])."""
    count = real.sum(-1, keepdim=True)
    length = _round_up(int(count.max()), block_size)
    order = (~real).to(torch.int8).argsort(dim=-1, stable=True)  # real candidates first, in order
    rank = torch.arange(length, device=real.device) - (length - count)  # [B, Hkv, L]
    present = rank >= 0
    source = order.gather(-1, rank.clamp(min=0))
    return torch.where(present, source, real.shape[-1]), present


def kv_cache_sparse_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                         is_causal: bool, scale: float | None, keys: torch.Tensor, values: torch.Tensor,
                         positions: torch.Tensor, scores: torch.Tensor, seen: torch.Tensor, policy: str, sink: int,
                         recent: int, window: int, pool: int, block_size: int, estimator: str, selector: str,
                         amount: float, sink_blocks: int, local_blocks: int, min_seq_len: int,
                         plan_window: int, decode_keep: float) -> torch.Tensor:
    """The cache step of a sparse site; sequence-major [B, T, Hq, Dv] like ``kv_cache_step``.

    Each row's cached tokens and real new tokens are laid out right-aligned on a block grid, the new
    queries likewise, so a row plans and attends exactly as it does alone. A row whose keys are fewer than
    ``min_seq_len``, or whose new tokens are fewer than a block (a decode or verify step), keeps every
    block; when every row does, the dense step runs, or the query-aware step with ``decode_keep`` < 1."""
    if rereading():  # KVzip's re-read scores every key by what it is paid, so it reads them all
        return kv_cache_step(q, k, v, mask, is_causal, scale, keys, values, positions, scores, seen, policy, sink,
                             recent, window, pool)
    batch, q_heads, length, head_dim = q.shape
    kv_heads, groups = k.shape[1], q_heads // k.shape[1]
    held = _held_slots(positions)
    key_valid, query_valid = token_validity(mask, is_causal, batch, length, q.device)
    real = torch.cat([positions[:, :, :held] >= 0, key_valid[:, None, :].expand(batch, kv_heads, length)], -1)
    few_keys = real.sum(-1).amax(-1) < min_seq_len  # [B]: rows too short to plan read every key, as alone
    if decode_keep < 1.0 and length < block_size and not bool(few_keys.all()):
        return _query_aware_step(q, k, v, mask, is_causal, scale, keys, values, positions, scores, seen, policy,
                                 sink, recent, window, pool, held, torch.where(few_keys, 1.0, decode_keep),
                                 key_valid, query_valid)
    # rows that read densely: too few keys, or too few new tokens for a prompt chunk (a decode or verify step)
    short = few_keys | (key_valid.sum(-1) < block_size)  # [B]
    if bool(short.all()):
        return kv_cache_step(q, k, v, mask, is_causal, scale, keys, values, positions, scores, seen, policy, sink,
                             recent, window, pool)
    scale = softmax_scale(scale, head_dim)
    source, present = _right_aligned(real, block_size)  # [B, Hkv, L]
    width = _round_up(length, block_size)
    pad_q = width - length
    index = source[..., None]
    keys_all = torch.cat([keys[:, :, :held], k.to(keys.dtype), keys[:, :, :1]], 2)
    values_all = torch.cat([values[:, :, :held], v.to(values.dtype), values[:, :, :1]], 2)
    keys_al = keys_all.gather(2, index.expand(*source.shape, keys.shape[-1]))
    values_al = values_all.gather(2, index.expand(*source.shape, values.shape[-1]))
    q_al = torch.nn.functional.pad(q, (0, 0, pad_q, 0))
    queries = torch.nn.functional.pad(query_valid, (pad_q, 0))  # [B, T']
    visible = (present.repeat_interleave(groups, 1)[:, :, None, :] & queries[:, None, :, None]
               & causal_mask(width, source.shape[-1], q.device))  # [B, Hq, T', L]
    first_block = (source.shape[-1] - real.sum(-1).amax(-1)) // block_size  # [B]: a row's sinks start here
    counts, indices = build_plan(q_al, keys_al, visible, True, scale, block_size, estimator, selector, amount,
                                 sink_blocks, local_blocks, 0, plan_window, first_block)
    if bool(short.any()):  # these rows keep every block, as they would alone
        every = build_plan(q_al, keys_al, visible, True, scale, block_size, estimator, selector, amount,
                           sink_blocks, local_blocks, source.shape[-1] + 1, plan_window, first_block)
        counts = torch.where(short[:, None, None], every[0], counts)
        indices = torch.where(short[:, None, None, None], every[1], indices)
    out = sparse_attention_gather(q_al, keys_al, values_al, visible, True, scale, counts, indices, block_size)
    out = (out * visible.any(-1).transpose(1, 2)[..., None].to(out.dtype))[:, pad_q:]  # seeing nothing gives 0

    rule = POLICIES[policy]
    masses = None
    observed = rule.observe(query_valid, window)
    if rule.uses_attention and not masses_skipped():
        read = visible & plan_token_mask(counts, indices, block_size, width, source.shape[-1], q_heads)
        by_key = _slot_masses(q_al, keys_al, read, scale, torch.nn.functional.pad(observed, (pad_q, 0)), rule)
        # [B, Hkv, L], back to slots and new tokens:
        masses = by_key.new_zeros(batch, kv_heads, held + length + 1).scatter_add_(-1, source, by_key)[..., :-1]
    score_and_write(q, k, v, keys, values, positions, scores, seen, key_valid, rule, masses, observed, held, sink,
                    recent, scale, pool)
    return out


def _query_aware_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      is_causal: bool, scale: float | None, keys: torch.Tensor, values: torch.Tensor,
                      positions: torch.Tensor, scores: torch.Tensor, seen: torch.Tensor, policy: str, sink: int,
                      recent: int, window: int, pool: int, held: int, keep: torch.Tensor, key_valid: torch.Tensor,
                      query_valid: torch.Tensor) -> torch.Tensor:
    """A decode step that reads the top ``keep`` [B] share of each row's keys per KV head (cached tokens
    and the new ones, as its mask allows); score-based policies see the masses of the keys it read. Then
    the cache takes the new tokens as the dense step does (``evict_and_write``). ``key_valid`` /
    ``query_valid`` [B, T]: the new tokens' ``token_validity``."""
    batch, q_heads, length, _ = q.shape
    kv_heads = k.shape[1]
    allowed = allowed_new(mask, is_causal, batch, length, q.device)
    if allowed is None:
        allowed = torch.ones(batch, 1, length, length, dtype=torch.bool, device=q.device)
    cached = (positions[:, :, None, :held] >= 0).repeat_interleave(q_heads // kv_heads, 1)  # [B, Hq, 1, held]
    visible = torch.cat([cached.expand(batch, q_heads, length, held),
                         allowed.expand(batch, q_heads, length, length)], -1)
    rule = POLICIES[policy]
    observed = rule.observe(query_valid, window)
    out, masses = query_aware_attention(q, torch.cat([keys[:, :, :held], k.to(keys.dtype)], 2),
                                        torch.cat([values[:, :, :held], v.to(values.dtype)], 2), visible, scale,
                                        keep, observed if rule.uses_attention else None, rule.masses)
    score_and_write(q, k, v, keys, values, positions, scores, seen, key_valid, rule, masses, observed, held, sink,
                    recent, scale, pool)
    return out
