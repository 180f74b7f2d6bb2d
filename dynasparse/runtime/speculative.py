"""Self-speculative decoding (LayerSkip / DEL): the model's first blocks draft, the whole model verifies.

Each round, per row: the drafter (blocks 0..i + the model's own head, ``ExitGateConfig(mode="draft")``)
proposes ``k`` tokens one at a time; the full model reads the pending token and the ``k`` drafts in one
pass; the longest prefix of drafts that equals the full model's greedy choice is kept, plus the full
model's own next token. Rejected tokens are rolled back from both caches. Rows accept different numbers
of tokens and simply sit at different positions (every row has its own positions and cache slots), so
batching needs no padding. ``k`` adapts to acceptance: longer after a round where every row accepted
everything, shorter when fewer than half of the drafts were accepted.

With a bounded cache, drafts never evict: both caches have reserve slots beyond their budget for a round's
tokens, so a rollback never needs a slot that was given away; once a round is verified the caches shrink
back to the budget (``KVCache.shrink``), evicting among verified tokens only. Score-based policies keep
the attention mass that rejected drafts' queries gave to earlier tokens.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

import torch

from dynasparse.config import BaseConfig
from dynasparse.errors import DynasparseError
from dynasparse.runtime.steps import GenerateOutput, GenerateStats, TorchSteps, decoder_for, prefill

if TYPE_CHECKING:  # annotations only: the draft config comes from the exit-gate technique's record
    from dynasparse.passes.exit_gate import ExitGateConfig


def _check(draft: ExitGateConfig, temperature: float, model) -> None:
    if draft.mode != "draft":
        raise DynasparseError("self-speculative decoding takes ExitGateConfig(after_blocks=(i,), mode='draft')")
    if temperature != 0:
        raise DynasparseError("self-speculative decoding here is greedy (temperature=0), where it is lossless")
    if not isinstance(model, torch.nn.Module):
        raise DynasparseError("self-speculative decoding runs torch modules (it needs a drafter cut from the "
                              "model); pass the model, not an ONNX session")


@torch.no_grad()
def self_speculative(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     max_new_tokens: int, draft: ExitGateConfig, configs: list[BaseConfig], temperature: float,
                     eos: list[int], pad: int, stream: Callable[[torch.Tensor], None] | None,
                     compile: bool | str = False) -> GenerateOutput:
    """``configs``: the decoder's other configs (its cache's, sparse attention's), for both models."""
    _check(draft, temperature, model)
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    longest = 2 * draft.draft_tokens
    room = prompt_len + max_new_tokens + 2 * longest + 2
    reserve = longest + 2  # a round's tokens: the pending one and the drafts, plus a catch-up for the drafter
    full = TorchSteps(decoder_for(model, configs), batch, room, device, compile, reserve, prompt_len)
    drafter = TorchSteps(decoder_for(model, [*configs, draft]), batch, room, device, compile, reserve, prompt_len)
    stats = GenerateStats(prompt_len, 0, cache_capacity=full.capacities + drafter.capacities,
                          cache_prefill_bytes=full.allocated_bytes + drafter.allocated_bytes,
                          cache_full_bytes=full.full_bytes + drafter.full_bytes)

    begin = time.perf_counter()
    logits = prefill(full, input_ids, attention_mask, full.config.chunk_size)
    prefill(drafter, input_ids, attention_mask, drafter.config.chunk_size)
    stats.prefill_seconds = time.perf_counter() - begin
    stats.cache_allocated_bytes = full.allocated_bytes + drafter.allocated_bytes

    real = attention_mask.long().sum(-1)  # tokens in each row's caches
    stats.cache_used_bytes.append(full.used_bytes(real.tolist()) + drafter.used_bytes(real.tolist()))
    pending = logits.argmax(-1)  # committed, not yet read by either model
    position = real.clone()  # position id of the pending token
    catch_up = torch.zeros(batch, dtype=torch.long, device=device)  # a draft the drafter has not read yet
    needs_catch_up = torch.zeros(batch, dtype=torch.bool, device=device)
    produced: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    k = draft.draft_tokens
    begin = time.perf_counter()
    for row, token in enumerate(pending.tolist()):
        _commit(produced, done, row, [token], max_new_tokens, eos)
    while not all(done):
        # draft k tokens; the first draft step also reads a draft accepted last round that the drafter skipped
        ids = torch.stack([catch_up, pending], 1)
        mask = torch.stack([needs_catch_up.long(), torch.ones_like(pending)], 1)
        positions = torch.stack([position - 1, position], 1)
        drafts = []
        for i in range(k):
            step_logits = drafter(ids, mask, positions, last_only=True)[:, -1]
            drafts.append(step_logits.argmax(-1))
            ids, mask, positions = drafts[-1][:, None], torch.ones_like(ids[:, -1:]), positions[:, -1:] + 1
        drafted = torch.stack(drafts, 1)  # [B, k]
        # verify: the full model reads the pending token and every draft in one pass
        candidates = torch.cat([pending[:, None], drafted], 1)
        targets = full(candidates, torch.ones_like(candidates),
                       position[:, None] + torch.arange(k + 1, device=device)).argmax(-1)  # [B, k + 1]
        accepted = (drafted == targets[:, :k]).long().cumprod(1).sum(1)  # [B]
        bonus = targets.gather(1, accepted[:, None])[:, 0]
        full.cache.rollback(real + accepted + 1)
        drafter.cache.rollback(real + torch.clamp(accepted + 1, max=k))
        full.cache.shrink()
        drafter.cache.shrink()
        needs_catch_up = accepted == k
        catch_up = drafted[:, -1]
        real, position = real + accepted + 1, position + accepted + 1
        pending = bonus
        stats.verify_steps += 1
        stats.drafted += k * batch
        stats.accepted += int(accepted.sum())
        stats.cache_used_bytes.append(full.cache.held_bytes() + drafter.cache.held_bytes())
        for row, (n, tokens, extra) in enumerate(zip(accepted.tolist(), drafted.tolist(), bonus.tolist())):
            _commit(produced, done, row, tokens[:n] + [extra], max_new_tokens, eos)
        if stream is not None:
            stream(bonus)
        if bool((accepted == k).all()):
            k = min(k + 1, longest)
        elif float(accepted.float().mean()) < k / 2:
            k = max(1, k - 1)
    stats.decode_seconds = time.perf_counter() - begin
    stats.new_tokens = max(len(p) for p in produced)
    new = torch.full((batch, stats.new_tokens), pad, dtype=input_ids.dtype, device=device)
    for row, tokens in enumerate(produced):
        new[row, :len(tokens)] = torch.tensor(tokens, dtype=input_ids.dtype)
    return GenerateOutput(torch.cat([input_ids, new], 1), stats)


def _commit(produced: list[list[int]], done: list[bool], row: int, tokens: list[int], limit: int,
            eos: list[int]) -> None:
    """Append a row's newly accepted tokens, up to ``limit`` and through its first stop token."""
    for token in tokens:
        if done[row]:
            return
        produced[row].append(token)
        done[row] = len(produced[row]) >= limit or token in eos
