"""Masked-diffusion decoding (MDLM, LLaDA): start the answer as masks, unmask the surest tokens step by step.

Each step the model reads the whole sequence, predicts every masked position, and the most confident
predictions (the same count in every row, so a batch stays rectangular) become tokens; LLaDA's
low-confidence remasking with greedy predictions, so a run is deterministic. With ``block_length`` the
answer is unmasked block by block, left to right (LLaDA's semi-autoregressive decoding): a small model
otherwise fills the far end first with its surest guess, whitespace. Over a model optimized with
``DelayedKVConfig`` a step computes only the masked tokens and those decoded in the last ``delay`` steps,
over cached keys and values, and every ``refresh_every`` steps recomputes everything (dKV-Cache).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from dynasparse.errors import DynasparseError
from dynasparse.runtime.delayed_kv import DelayedKVModel
from dynasparse.runtime.steps import logits_of


@dataclass
class UnmaskStats:
    seconds: list[float] = field(default_factory=list)  # the model call of each step
    active: list[int] = field(default_factory=list)  # tokens per row each step computed
    length: int = 0  # tokens per row in all (prompt + answer)

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds)

    @property
    def computed_share(self) -> float:
        """Token-work done, as a share of recomputing every token at every step."""
        return sum(self.active) / max(1, self.length * len(self.active))


@dataclass
class Unmasked:
    tokens: torch.Tensor  # [B, prompt + new_tokens]
    stats: UnmaskStats


def _per_step(new_tokens: int, steps: int) -> list[int]:
    """Tokens unmasked at each step: as even as the division allows, the larger counts first."""
    return [new_tokens // steps + (1 if step < new_tokens % steps else 0) for step in range(steps)]


def _check(prompt: torch.Tensor, new_tokens: int, steps: int, mask_id: int, attention_mask: torch.Tensor | None,
           block_length: int | None) -> None:
    if prompt.dim() != 2 or prompt.dtype != torch.long:
        raise DynasparseError(f"prompt must be token ids [batch, length] (long), got {prompt.dtype} "
                              f"{tuple(prompt.shape)}")
    if new_tokens < 1 or not 1 <= steps <= new_tokens:
        raise DynasparseError(f"new_tokens={new_tokens}, steps={steps}: unmask at least one token, in 1 to "
                              "new_tokens steps")
    if bool((prompt == mask_id).any()):
        raise DynasparseError(f"the prompt holds the mask token ({mask_id}); unmask decodes the positions after "
                              "the prompt, so give a prompt without masks")
    if block_length is not None and (block_length < 1 or new_tokens % block_length
                                     or steps % (new_tokens // block_length)):
        raise DynasparseError(f"block_length={block_length}: it must divide new_tokens={new_tokens} into blocks "
                              f"that share steps={steps} evenly")
    if attention_mask is not None and attention_mask.shape != prompt.shape:
        raise DynasparseError(f"attention_mask has shape {tuple(attention_mask.shape)}, the prompt "
                              f"{tuple(prompt.shape)}; give one mask entry per prompt token")


@torch.no_grad()
def unmask(model: Any, prompt: torch.Tensor, *, new_tokens: int, steps: int, mask_id: int,
           attention_mask: torch.Tensor | None = None, block_length: int | None = None,
           progress: bool = True) -> Unmasked:
    """Decode ``new_tokens`` masked positions after ``prompt`` [B, P] in ``steps`` steps with ``model``
    (called as ``model(input_ids=..., attention_mask=...)``, returning logits [B, L, V]); ``attention_mask``
    marks the prompt's padding (left or right); ``block_length``: unmask blocks of that many positions left
    to right, each in an equal share of the steps. Returns the whole sequences and per-step stats."""
    _check(prompt, new_tokens, steps, mask_id, attention_mask, block_length)
    batch, device = prompt.shape[0], prompt.device
    tokens = torch.cat([prompt, torch.full((batch, new_tokens), mask_id, device=device)], 1)
    mask = torch.cat([torch.ones_like(prompt) if attention_mask is None else attention_mask,
                      torch.ones(batch, new_tokens, dtype=prompt.dtype, device=device)], 1)
    runner = getattr(model, "runner", None)
    cache = runner if isinstance(runner, DelayedKVModel) else None
    stats = UnmaskStats(length=tokens.shape[1])
    recent: list[torch.Tensor] = []  # the positions decoded in each of the last `delay` steps
    block_length = block_length or new_tokens
    blocks = new_tokens // block_length
    schedule = [(prompt.shape[1] + block * block_length, count) for block in range(blocks)
                for count in _per_step(block_length, steps // blocks)]
    if cache is not None:
        cache.start(batch, tokens.shape[1], device)
    try:
        for step, (block_start, count) in enumerate(tqdm(schedule, desc="unmasking", disable=not progress)):
            masked = tokens == mask_id
            index = None
            if cache is not None:
                config = cache.plan.config
                if step % config.refresh_every:
                    active = masked.clone()
                    for positions in recent:
                        active.scatter_(1, positions, True)
                    index = active.nonzero()[:, 1].reshape(batch, -1)
                cache.active = index
            start = time.perf_counter()
            logits = logits_of(model(input_ids=tokens, attention_mask=mask))
            stats.seconds.append(time.perf_counter() - start)
            stats.active.append(tokens.shape[1] if index is None else index.shape[1])
            logits[..., mask_id] = float("-inf")
            confidence, predicted = logits.float().softmax(-1).max(-1)
            if index is not None:  # back to positions: tokens that were not computed are not candidates
                confidence = torch.full(masked.shape, float("-inf"), device=device).scatter(1, index, confidence)
                predicted = torch.zeros_like(tokens).scatter(1, index, predicted)
            candidates = masked.clone()
            candidates[:, block_start + block_length:] = False  # later blocks wait their turn
            confidence = confidence.masked_fill(~candidates, float("-inf"))
            chosen = confidence.topk(count, dim=1).indices
            tokens.scatter_(1, chosen, predicted.gather(1, chosen))
            if cache is not None:
                recent = (recent + [chosen])[-config.delay:] if config.delay else []
    finally:
        if cache is not None:
            cache.stop()
    return Unmasked(tokens, stats)
