"""The compressed tier of the KV cache: what leaves the full-precision cache is kept quantized (KIVI) and
read back per step by a query-aware block selection (Quest / ArkVale).

A tiered cache site has two parts:

* the **hot** cache, the usual slots (``kernels.kv_cache``) in the model's dtype: the sinks, the recent
  window, up to one block of older tokens waiting to be coded, and the **pinned** tokens: where a byte budget
  holds every block of the tier with bytes to spare, the highest-scored tokens stay in full precision
  (``pin``; a pinned token's score is +inf);
* the **cold** tier, ``blocks`` blocks of ``group`` tokens each, per (row, KV head): keys coded per channel
  over the block, values per token over groups of channels (``kernels.quantize``), positions (int32) and
  one score per block (the highest score a token of it had when it left the hot cache).

Tokens leave the hot cache oldest first, a whole block at a time (``spill``): after the prompt every full
block beyond the sinks, the recent window and the pinned tokens (``KVCache.compress``), during decoding
whenever the hot slots cannot take the step's tokens. When the cold tier is full, the lowest-scored blocks (the new ones included)
are dropped: the budget decides how much is kept, the tier how precisely.

A step over a tier that holds something attends over the hot slots, the new tokens and the cold blocks it
reads: the top ``read`` share of them per KV head, ranked by an upper bound of the query's logit over each
block (each channel's minimum and maximum key are the block's code range, so the bound costs no extra
bytes), dequantized only for the blocks read. The blocks' attention (``tier_attention``: a C++ kernel on CPU,
``kv_tier_cpu``, that reads the codes in place) joins the full-precision slots' softmax by its log-sum-exp.
Until something is spilled the site's own cache step runs (dense or block-sparse), so a tier that never fills
is exactly the full-precision cache.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from dynasparse.errors import DynasparseError
from dynasparse.kernels import kv_tier_cpu
from dynasparse.kernels.attention import softmax_scale
from dynasparse.kernels.kv_cache import (STATE_FIELDS, cache_attention_reference, score_and_write,
                                         token_validity)
from dynasparse.kernels.policies import POLICIES, Policy, step_candidates
from dynasparse.kernels.quantize import (SCALE_DTYPE, dequantize_keys, dequantize_values, quantize_keys,
                                         quantize_values)

TIER_FIELDS = ("cold_keys", "cold_key_scale", "cold_key_min", "cold_values", "cold_value_scale", "cold_value_min",
               "cold_positions", "cold_scores")


def empty_tier(batch: int, kv_heads: int, blocks: int, head_dim: int, value_dim: int, bits: int, group: int,
               device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """A cold tier of ``blocks`` blocks of ``group`` tokens with nothing in it."""
    shape = (batch, kv_heads, blocks)
    scales = {"dtype": SCALE_DTYPE, "device": device}
    return {
        "cold_keys": torch.zeros(*shape, group, head_dim * bits // 8, dtype=torch.uint8, device=device),
        "cold_key_scale": torch.zeros(*shape, head_dim, **scales),
        "cold_key_min": torch.zeros(*shape, head_dim, **scales),
        "cold_values": torch.zeros(*shape, group, value_dim * bits // 8, dtype=torch.uint8, device=device),
        "cold_value_scale": torch.zeros(*shape, group, value_dim // group, **scales),
        "cold_value_min": torch.zeros(*shape, group, value_dim // group, **scales),
        "cold_positions": torch.full((*shape, group), -1, dtype=torch.int32, device=device),
        "cold_scores": torch.zeros(*shape, dtype=torch.float32, device=device),
    }


def block_bytes(kv_heads: int, head_dim: int, value_dim: int, bits: int, group: int) -> int:
    """Bytes one cold block takes per row: codes, scales and minima, positions and its score."""
    return sum(t.nbytes for t in empty_tier(1, kv_heads, 1, head_dim, value_dim, bits, group, "meta").values())


# --- moving tokens from the hot cache to the tier ---------------------------------------------------------------

def _spillable(hot: dict[str, torch.Tensor], sink: int, recent: int, horizon: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, S]: the hot tokens that may leave: past the sinks, older than the recent window of a row that
    will have seen ``horizon`` [B] tokens, not pinned."""
    positions = hot["positions"]
    return (positions >= sink) & (positions < (horizon[:, None, None] - recent)) & ~hot["scores"].isposinf()


def pin(hot: dict[str, torch.Tensor], count: int, sink: int, recent: int, horizon: torch.Tensor) -> None:
    """Keep the ``count`` highest-scored spillable tokens of each (row, KV head) in full precision for good,
    in place: their score becomes +inf, which ``spill`` never moves and ``tiered_step`` keeps through the
    policy's updates. Run after the prompt, once its scores are final (KVzip's re-read)."""
    if count <= 0:
        return
    spillable = _spillable(hot, sink, recent, horizon)
    scores = hot["scores"]
    rank = scores.masked_fill(~spillable, -math.inf).argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
    scores.masked_fill_(spillable & (rank < count), math.inf)


def _admit(cold_valid: torch.Tensor, cold_scores: torch.Tensor, new_valid: torch.Tensor, new_scores: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Which blocks the tier keeps when ``new_valid`` [B, Hkv, M] blocks arrive: the highest scored, up to
    its size (among equals the older block goes). Returns (the new block each cold block takes, -1 for
    none [B, Hkv, NB]; cold blocks dropped [B, Hkv, NB])."""
    blocks, arriving = cold_valid.shape[-1], new_valid.shape[-1]
    real = torch.cat([cold_valid, new_valid], -1)
    priority = torch.cat([cold_scores, new_scores], -1).masked_fill(~real, math.inf)
    excess = (real.sum(-1, keepdim=True) - blocks).clamp(min=0)
    dropped = real & (priority.sort(dim=-1, stable=True).indices.argsort(dim=-1) < excess)
    free = ~cold_valid | dropped[..., :blocks]
    kept_new = new_valid & ~dropped[..., blocks:]
    # the r-th free block takes the r-th kept new block
    free_rank = torch.where(free, free.long().cumsum(-1) - 1, arriving)
    new_rank = torch.where(kept_new, kept_new.long().cumsum(-1) - 1, arriving)
    new_of_rank = torch.full((*new_valid.shape[:2], arriving + 1), -1, dtype=torch.long, device=real.device)
    new_of_rank.scatter_(-1, new_rank, torch.arange(arriving, device=real.device).expand_as(new_rank))
    new_of_rank[..., arriving] = -1
    return new_of_rank.gather(-1, free_rank.clamp(max=arriving)), dropped[..., :blocks]


def spill(hot: dict[str, torch.Tensor], tier: dict[str, torch.Tensor], bits: int, sink: int, recent: int,
          horizon: torch.Tensor, rows: torch.Tensor | None = None, blocks: int | None = None,
          fresh: bool = False, keep_last: int = 0) -> None:
    """Move the oldest blocks of the hot cache's spillable tokens (past the sinks, older than the recent
    window of a row that will have seen ``horizon`` [B] tokens, not pinned) into the tier, in place.

    ``blocks=None``: every full block, for all rows (after the prompt; a partial block stays hot).
    ``blocks=n``: n blocks per (row, KV head) of ``rows`` [B], the last one partial if fewer tokens are
    spillable (a step bringing more tokens than a block). ``fresh``: the new blocks outrank every block
    already in the tier (their scores are not comparable with the prompt's, see ``make_room``).
    ``keep_last``: blocks holding one of the last ``keep_last`` tokens before ``horizon`` are never dropped
    (the end of a prompt, where its question sits)."""
    positions, group = hot["positions"], tier["cold_positions"].shape[-1]
    batch, kv_heads, slots = positions.shape
    spillable = _spillable(hot, sink, recent, horizon)
    if rows is not None:
        spillable &= rows[:, None, None]
    available = spillable.sum(-1)  # [B, Hkv]
    if blocks is None:
        moving = available // group  # [B, Hkv] blocks that leave
        count = int(moving.max())
    else:
        moving = torch.minimum(-(-available // group), torch.full_like(available, blocks))
        count = blocks
        if bool((moving.amin(-1) < 1)[rows if rows is not None else slice(None)].any()):
            brings = int((horizon - hot["seen"]).max())
            raise DynasparseError(
                f"a step of {brings} tokens does not fit the tiered cache's {slots - 1} full-precision slots beside "
                f"its {sink} sinks (sink + recent + tier_group); raise KVEvictionConfig.recent or tier_group, or "
                f"feed at most {slots - 1 - sink} tokens per step after the prompt")
    if count == 0:
        return
    order = torch.where(spillable, positions, torch.iinfo(torch.long).max).argsort(dim=-1, stable=True)
    order = torch.nn.functional.pad(order, (0, max(count * group - slots, 0)), value=slots)[..., :count * group]
    rank = torch.arange(count * group, device=positions.device)
    real = rank < torch.minimum(available, moving * group)[..., None]  # [B, Hkv, M*G]: tokens that leave
    first = order.reshape(batch, kv_heads, count, group)[..., :1].expand(-1, -1, -1, group).flatten(2)
    flat = torch.where(real, order, first).clamp(max=slots - 1)  # a partial block repeats its first token
    arriving = torch.arange(count, device=positions.device) < moving[..., None]  # [B, Hkv, M]

    def take(name: str) -> torch.Tensor:
        tensor = hot[name]
        at = flat if tensor.dim() == 3 else flat[..., None].expand(*flat.shape, tensor.shape[-1])
        return tensor.gather(2, at).reshape(batch, kv_heads, count, group, *tensor.shape[3:])

    key_codes, key_scale, key_min = quantize_keys(take("keys"), bits)
    value_codes, value_scale, value_min = quantize_values(take("values"), bits, group)  # one group size for both
    block_real = real.reshape(batch, kv_heads, count, group)
    new = {"cold_keys": key_codes, "cold_key_scale": key_scale, "cold_key_min": key_min, "cold_values": value_codes,
           "cold_value_scale": value_scale, "cold_value_min": value_min,
           "cold_positions": take("positions").masked_fill(~block_real, -1).int(),
           "cold_scores": torch.full((batch, kv_heads, count), math.inf, device=positions.device) if fresh
           else take("scores").amax(-1)}
    if keep_last:
        last = new["cold_positions"].amax(-1) >= (horizon[:, None, None] - recent - keep_last)
        new["cold_scores"] = new["cold_scores"].masked_fill(last, math.inf)
    cold_valid = (tier["cold_positions"] >= 0).any(-1)
    source, dropped = _admit(cold_valid, tier["cold_scores"], arriving, new["cold_scores"])
    tier["cold_positions"].masked_fill_(dropped[..., None], -1)
    row, head, slot = (source >= 0).nonzero(as_tuple=True)  # the tier blocks that take a new one
    arrival = source[row, head, slot]
    for name, tensor in new.items():
        tier[name][row, head, slot] = tensor[row, head, arrival].to(tier[name].dtype)
    left = torch.zeros(batch, kv_heads, slots + 1, dtype=torch.bool, device=positions.device)
    left.scatter_(-1, order, real & arriving.repeat_interleave(group, -1))
    positions.masked_fill_(left[..., :slots], -1)


def make_room(hot: dict[str, torch.Tensor], tier: dict[str, torch.Tensor], bits: int, sink: int, recent: int,
              incoming: torch.Tensor, fresh: bool = False) -> None:
    """Spill blocks until every row's hot slots can take its ``incoming`` [B] tokens. ``fresh``: blocks that
    leave now outrank the tier's older blocks: a policy that scores the prompt by re-reading it (KVzip)
    gives the prompt's tokens scores the later steps' attention does not compare with, so what is read
    after the prompt is kept, as kvpress keeps every generated token, and the prompt's lowest blocks go."""
    while True:
        free = (hot["positions"][..., :-1] < 0).sum(-1).amin(-1)  # [B]
        short = free < incoming
        if not bool(short.any()):
            return
        spill(hot, tier, bits, sink, recent, hot["seen"] + incoming, short, blocks=1, fresh=fresh)


def rollback(tier: dict[str, torch.Tensor], keep: torch.Tensor) -> None:
    """Forget the tier's tokens at positions ``keep[b]`` and after (rejected drafts)."""
    tier["cold_positions"].masked_fill_(tier["cold_positions"] >= keep[:, None, None, None], -1)


# --- reading the tier ---------------------------------------------------------------------------------------------

def block_bounds_reference(q: torch.Tensor, tier: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """[B, Hkv, NB]: the most any of the query rows ``q`` [B, Hkv, R, D] can score a key of each block, from
    each channel's code range (the block's minimum and maximum key); -inf for a block holding no token."""
    low = tier["cold_key_min"].float()
    high = low + ((1 << bits) - 1) * tier["cold_key_scale"].float()
    q = q.float()
    bound = q.clamp(min=0) @ high.transpose(-2, -1) + q.clamp(max=0) @ low.transpose(-2, -1)
    return bound.amax(2).masked_fill(~(tier["cold_positions"] >= 0).any(-1), -math.inf)


def _chosen_blocks(q: torch.Tensor, tier: dict[str, torch.Tensor], bits: int, read: float) -> torch.Tensor:
    """[B, Hkv, K] the blocks a step's query rows ``q`` [B, Hkv, R, D] read: all of them, or the top ``read``
    share by the rows' logit bound over each block."""
    batch, kv_heads, blocks, _ = tier["cold_positions"].shape
    count = blocks if read >= 1.0 else max(1, math.ceil(read * blocks))
    if count == blocks:
        return torch.arange(blocks, device=q.device).expand(batch, kv_heads, blocks)
    if kv_tier_cpu.usable(q):
        bound = kv_tier_cpu.tier_block_bounds_cpu(q, tier, bits)
    else:
        bound = block_bounds_reference(q, tier, bits)
    return bound.topk(count, -1).indices


def tier_attention_reference(q: torch.Tensor, tier: dict[str, torch.Tensor], chosen: torch.Tensor, bits: int,
                             scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the query rows ``q`` [B, Hkv, R, D] (a KV head's group of query heads times the step's
    tokens) over the tokens of the ``chosen`` [B, Hkv, K] blocks, dequantized, in fp32: (out [B, Hkv, R, Dv]
    normalised over those tokens, lse [B, Hkv, R] its log-normaliser; a row that saw nothing: 0 and -inf)."""
    group = tier["cold_positions"].shape[-1]

    def take(name: str) -> torch.Tensor:
        tensor = tier[name]
        at = chosen.reshape(*chosen.shape, *([1] * (tensor.dim() - 3)))
        return tensor.gather(2, at.expand(*chosen.shape, *tensor.shape[3:]))

    keys = dequantize_keys(take("cold_keys"), take("cold_key_scale"), take("cold_key_min"), bits).flatten(2, 3)
    values = dequantize_values(take("cold_values"), take("cold_value_scale"), take("cold_value_min"), bits,
                               group).flatten(2, 3)
    logits = (q.float() @ keys.transpose(-2, -1)) * scale
    logits = logits.masked_fill((take("cold_positions") < 0).flatten(2)[:, :, None, :], -math.inf)
    lse = logits.logsumexp(-1)
    out = logits.softmax(-1).nan_to_num(0.0) @ values
    return out, lse


def tier_attention(q: torch.Tensor, tier: dict[str, torch.Tensor], chosen: torch.Tensor, bits: int, scale: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``tier_attention_reference``, through the C++ kernel on CPU where it built."""
    if kv_tier_cpu.usable(q):
        return kv_tier_cpu.tier_attention_cpu(q, tier, chosen, bits, scale)
    return tier_attention_reference(q, tier, chosen, bits, scale)


def tiered_step(inner: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None, is_causal: bool, scale: float | None, hot: list[torch.Tensor],
                tier: list[torch.Tensor], policy: str, sink: int, recent: int, window: int, pool: int, bits: int,
                read: float, plan: tuple = ()) -> torch.Tensor:
    """One cache step of a tiered site, sequence-major [B, T, Hq, Dv]: ``inner`` (the site's own cache step,
    called as ``inner(q, k, v, mask, is_causal, scale, *hot, policy, sink, recent, window, pool, *plan)``)
    while the tier is empty, attention over hot + the blocks read otherwise."""
    hot_state, cold = dict(zip(STATE_FIELDS, hot)), dict(zip(TIER_FIELDS, tier))
    if not cold["cold_positions"].shape[2]:
        return inner(q, k, v, mask, is_causal, scale, *hot, policy, sink, recent, window, pool, *plan)
    pinned = hot_state["scores"].isposinf()  # the policy's update may rescore them; they stay pinned
    out = _tiered_step(inner, q, k, v, mask, is_causal, scale, hot, hot_state, cold, policy, sink, recent, window,
                       pool, bits, read, plan)
    hot_state["scores"].masked_fill_(pinned, math.inf)
    return out


def _tiered_step(inner, q, k, v, mask, is_causal, scale, hot, hot_state, cold, policy, sink, recent, window, pool,
                 bits, read, plan) -> torch.Tensor:
    """``tiered_step`` over a site that has a tier (``hot_state`` and ``cold`` name the state's tensors)."""
    batch, _, length, _ = q.shape
    key_valid, query_valid = token_validity(mask, is_causal, batch, length, q.device)
    rule = POLICIES[policy]
    make_room(hot_state, cold, bits, sink, recent, key_valid.long().sum(-1), rule.rereads_prompt)
    if not bool((cold["cold_positions"] >= 0).any()):
        return inner(q, k, v, mask, is_causal, scale, *hot, policy, sink, recent, window, pool, *plan)
    keys, values, positions, scores, seen = hot
    scale = softmax_scale(scale, q.shape[-1])
    grouped = q.reshape(batch, k.shape[1], -1, q.shape[-1])  # [B, Hkv, G*T, D]: a KV head's query rows
    chosen = _chosen_blocks(grouped, cold, bits, read)
    observed = rule.observe(query_valid, window)
    held = keys.shape[2] - 1  # the hot slots; the scratch slot is empty
    if length == 1 and bool(key_valid.all()):  # a decode step: no eviction, the token takes the first free slot
        hot_now = (keys[:, :, :held], values[:, :, :held], positions[..., :held])
        if kv_tier_cpu.usable(q) and type(rule).masses is Policy.masses:  # one C++ call, masses pooled there
            out, mass_cache, mass_new = kv_tier_cpu.tier_decode_attention_cpu(
                grouped, cold, chosen, bits, scale, *hot_now, k, v, rule.reduce if rule.uses_attention else None)
            out = out.reshape(q.shape[0], q.shape[1], 1, -1).transpose(1, 2).to(q.dtype)
            if not rule.uses_attention:
                mass_cache = mass_new = None
        else:
            out, mass_cache, mass_new = _attend_one(q, k, v, *hot_now, tier_attention(grouped, cold, chosen, bits,
                                                                                       scale), scale, rule)
        _write_one(q, k, v, keys, values, positions, scores, seen, rule, mass_cache, mass_new, observed, held, scale,
                   pool)
        return out
    cold_attention = tier_attention(grouped, cold, chosen, bits, scale)
    out, mass_cache, mass_new = cache_attention_reference(
        q, k, v, mask, is_causal, scale, keys[:, :, :held], values[:, :, :held], positions[..., :held],
        observed if rule.uses_attention else None, rule, cold_attention)
    masses = None if mass_cache is None else torch.cat([mass_cache, mass_new], -1)
    score_and_write(q, k, v, keys, values, positions, scores, seen, key_valid, rule, masses, observed, held, sink,
                    recent, scale, pool)
    return out


def _attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                positions: torch.Tensor, cold: tuple[torch.Tensor, torch.Tensor], scale: float, rule
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``cache_attention_reference`` for one real token per row (nothing to mask among the new tokens): its
    query heads over the hot slots, the tier (one key: ``cold`` = (out, lse)) and itself, in fp32."""
    batch, q_heads, _, dim = q.shape
    kv_heads, held = k.shape[1], keys.shape[2]
    qg = q.float().reshape(batch, kv_heads, q_heads // kv_heads, dim)
    logits = qg @ torch.cat([keys, k], 2).float().transpose(-2, -1) * scale  # [B, Hkv, G, held + 1]
    logits[..., :held].masked_fill_((positions < 0)[:, :, None, :], -math.inf)
    probs = torch.cat([logits, cold[1][..., None]], -1).softmax(-1)
    out = probs[..., :held + 1] @ torch.cat([values, v], 2).float() + probs[..., held + 1:] * cold[0]
    out = out.reshape(batch, q_heads, 1, -1).transpose(1, 2).to(q.dtype)
    if not rule.uses_attention:
        return out, None, None
    return out, rule.masses(probs[..., :held], 1.0), rule.masses(probs[..., held:held + 1], 1.0)


def _write_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               positions: torch.Tensor, scores: torch.Tensor, seen: torch.Tensor, rule, mass_cache: torch.Tensor | None,
               mass_new: torch.Tensor | None, observed: torch.Tensor, held: int, scale: float, pool: int) -> None:
    """``score_and_write`` for one real token per row into hot slots with room (``make_room`` made it): the
    policy's update, then the token goes to each (row, KV head)'s first free slot, where ``evict_and_write``
    would put it, without ranking candidates for an eviction that cannot happen."""
    step_pos = seen[:, None]
    masses = None if mass_cache is None else (mass_cache, mass_new)
    cache_scores, new_scores = rule.update(step_candidates((keys, values, positions, scores), held, (q, k, v),
                                                           step_pos, masses, observed, scale, pool))
    scores[..., :held] = cache_scores
    slot = (positions[..., :held] < 0).to(torch.int8).argmax(-1, keepdim=True)  # [B, Hkv, 1]
    keys.scatter_(2, slot[..., None].expand_as(k), k.to(keys.dtype))
    values.scatter_(2, slot[..., None].expand_as(v), v.to(values.dtype))
    positions.scatter_(2, slot, step_pos[..., None].expand_as(slot))
    scores.scatter_(2, slot, new_scores)
    seen.add_(1)
