"""Self-speculative decoding (LayerSkip / DEL): the model's first blocks draft, the whole model verifies.

Each round, per row: a drafter (blocks 0..i + the model's own head, ``ExitGateConfig(mode="draft")``)
proposes ``k`` tokens one at a time; the full model reads the pending token and the ``k`` drafts in one
pass; the longest prefix of drafts that equals the full model's greedy choice is kept, plus the full
model's own next token. Rows that sit at one length (an unpadded batch) all keep the batch's shortest
agreed prefix, so the cache keeps its one-call append (rows at different lengths take a general path that
costs about twice as much per layer); rows already at different lengths (a left-padded batch) each keep their
own, since every row has its own positions and cache slots. Either way a kept draft is one the full model
agreed with, so the tokens are greedy's.

Which drafter, and how many drafts, is chosen per round from what was measured so far
(``draft_choice.DraftChooser``); a round with no drafts is a plain decoding step, which is what a model whose
early blocks do not predict its output ends up running.

The drafter has no cache of its own: its blocks read and write the first layers of the full model's cache
(LayerSkip's shared cache). Before verifying, the drafts are rolled back there, and the verify pass writes
every layer for the pending token and the drafts; rejected ones are rolled back after it. Drafts never
evict: the cache has reserve slots beyond its budget for a round's tokens, so a rollback never needs a slot
that was given away; once a round is verified the cache shrinks back to the budget (``KVCache.shrink``),
evicting among verified tokens only. Over a full or roomy cache the tokens are plain greedy's. Over a bounded
one they depend on the rounds drafted, whatever the policy: a verify pass's later queries still see tokens
a plain step would have evicted by then (and score-based policies keep the attention that drafts' queries
gave), and the chooser picks rounds from timings.
"""
from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Callable

import torch

from dynasparse.config import BaseConfig
from dynasparse.errors import DynasparseError
from dynasparse.runtime.draft_choice import DraftChooser, default_blocks
from dynasparse.runtime.steps import GenerateOutput, GenerateStats, TorchSteps, decoder_for, prefill

if TYPE_CHECKING:  # annotations only: the draft config comes from the exit-gate technique's record
    from dynasparse.passes.exit_gate import ExitGateConfig


def _check(draft: ExitGateConfig, temperature: float, model) -> None:
    if draft.mode != "draft":
        raise DynasparseError("self-speculative decoding takes ExitGateConfig(mode='draft')")
    if temperature != 0:
        raise DynasparseError("self-speculative decoding here is greedy (temperature=0), where it is lossless")
    if not isinstance(model, torch.nn.Module):
        raise DynasparseError("self-speculative decoding runs torch modules (it needs a drafter cut from the "
                              "model); pass the model, not an ONNX session")


def _drafter_blocks(draft: ExitGateConfig, depth: int) -> tuple[int, ...]:
    blocks = draft.after_blocks if draft.after_blocks is not None else default_blocks(depth)
    beyond = [b for b in blocks if b >= depth - 1]
    if beyond:
        raise DynasparseError(f"ExitGateConfig.after_blocks={draft.after_blocks}: the model has {depth} blocks, so "
                              f"a drafter ends after one of blocks 0..{depth - 2}, not {beyond[0]}")
    return blocks


def _clock(device: torch.device) -> float:
    """Seconds now, once the device has finished what was queued (the chooser compares pass times)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def self_speculative(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     max_new_tokens: int, draft: ExitGateConfig, configs: list[BaseConfig], temperature: float,
                     eos: list[int], pad: int, stream: Callable[[torch.Tensor], None] | None,
                     compile: bool | str = False) -> GenerateOutput:
    """``configs``: the decoder's other configs (its cache's, sparse attention's), for the full model and
    the drafters."""
    _check(draft, temperature, model)
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    longest = draft.draft_tokens
    room = prompt_len + max_new_tokens + 2 * longest + 2
    full = TorchSteps(decoder_for(model, configs), batch, room, device, compile, longest + 1, prompt_len)
    depth = len(full.cache.sites)
    # every drafter is captured before the clock starts; its steps bind to the cache once the prompt is in
    drafters = {block: decoder_for(model, [*configs, dataclasses.replace(draft, after_blocks=(block,))])
                for block in _drafter_blocks(draft, depth)}
    stats = GenerateStats(prompt_len, 0, cache_capacity=full.capacities, cache_prefill_bytes=full.allocated_bytes,
                          cache_full_bytes=full.full_bytes)

    begin = time.perf_counter()
    logits = prefill(full, input_ids, attention_mask, full.config.chunk_size)
    stats.prefill_seconds = time.perf_counter() - begin
    stats.cache_allocated_bytes = full.allocated_bytes
    steps = {block: TorchSteps(decoder, batch, room, device, compile, shared=full.cache)
             for block, decoder in drafters.items()}

    real = attention_mask.long().sum(-1)  # tokens in each row's cache
    stats.cache_used_bytes.append(full.used_bytes(real.tolist()))
    pending = logits.argmax(-1)  # committed, not yet read by the full model
    position = real.clone()  # position id of the pending token
    produced: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    chooser = DraftChooser(tuple(steps), depth, longest)
    begin = time.perf_counter()
    for row, token in enumerate(pending.tolist()):
        _commit(produced, done, row, [token], max_new_tokens, eos)
    bounded = any(capacity < full.cache.seq_len for capacity in full.cache.capacities)
    held = real.tolist()  # tokens in each row's cache, on the host
    while not all(done):
        block, k = chooser.choose()
        live = [row for row in range(batch) if not done[row]]
        start = _clock(device)
        if block is None:  # a plain decoding step, as lean as generate's
            bonus = full(pending[:, None], torch.ones_like(pending)[:, None], position[:, None],
                         last_only=True)[:, -1].argmax(-1)
            if bounded:
                full.cache.shrink()
            counts, drafted_rows, extras = [0] * batch, [[]] * batch, bonus.tolist()
            chooser.record(None, 0, 0.0, _clock(device) - start, [0] * len(live))
            real, position = real + 1, position + 1
        else:
            ids, positions, drafts = pending[:, None], position[:, None], []
            for _ in range(k):
                drafts.append(steps[block](ids, torch.ones_like(ids), positions, last_only=True)[:, -1].argmax(-1))
                ids, positions = drafts[-1][:, None], positions + 1
            drafted = torch.stack(drafts, 1)  # [B, k]
            full.cache.rollback(real)  # out of the shared layers: the verify pass writes them again
            drafted_at = _clock(device)
            candidates = torch.cat([pending[:, None], drafted], 1)
            targets = full(candidates, torch.ones_like(candidates),
                           position[:, None] + torch.arange(k + 1, device=device)).argmax(-1)  # [B, k + 1]
            accepted = (drafted == targets[:, :k]).long().cumprod(1).sum(1)  # [B]
            if len(set(held)) == 1:  # rows alike stay alike: the shortest agreed prefix of the rows generating
                accepted = accepted[live].min().expand(batch)
            bonus = targets.gather(1, accepted[:, None])[:, 0]
            full.cache.rollback(real + accepted + 1)
            full.cache.shrink()
            counts, drafted_rows, extras = accepted.tolist(), drafted.tolist(), bonus.tolist()
            chooser.record(block, k, drafted_at - start, _clock(device) - drafted_at, [counts[row] for row in live])
            real, position = real + accepted + 1, position + accepted + 1
        pending = bonus
        held = [n + c + 1 for n, c in zip(held, counts)]
        stats.verify_steps += 1
        stats.drafted += k * len(live)
        stats.accepted += sum(counts[row] for row in live)
        stats.cache_used_bytes.append(full.used_bytes(held))
        for row, (n, tokens, extra) in enumerate(zip(counts, drafted_rows, extras)):
            _commit(produced, done, row, tokens[:n] + [extra], max_new_tokens, eos)
        if stream is not None:
            stream(bonus)
    stats.decode_seconds = time.perf_counter() - begin
    stats.draft_rounds = dict(chooser.rounds)
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
