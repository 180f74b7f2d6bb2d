"""KVzip's scoring pass: the model reads its prompt a second time, and the cache keeps what that re-read used.

A question asked later may need any part of the context; a model that can reproduce the whole context from
the tokens it kept has kept what such a question needs. So after the prompt is in, each prompt chunk is fed
again (teacher-forced, at the positions right after the prompt: every token sits one prompt length after its
first copy) while the policy records, per cached token, the most attention any re-read query paid it. The
re-read tokens are rolled back after each chunk (their slots empty again, as rejected drafts are), so each
chunk reads the prompt's cache alone. As in KVzip, an instruction to repeat the context may come first in
each chunk (``repeat_prompt``): a model told to repeat leans on the first copy token by token, so what it
reads there is what reconstruction needs, rather than what the nearest text attracts (on SmolLM2 at 10% of
the bytes, a fact planted in 2k tokens is recalled 7/10 times with it and 4/10 without, question-aware).

What it costs: the first reading computes no masses (``prompt_phase("read")``), and each re-read chunk reads
every prompt key (sparse sites too) and takes its masses from the attention call's log-sum-exp. So the pass
is one more prefill whose chunks each attend to the whole prompt instead of what precedes them, plus one
more product of the queries with the keys: about 1.8x the prompt's prefill at 2k tokens on SmolLM2 (CPU).
"""
from __future__ import annotations

from typing import Callable

import torch

from dynasparse.kernels.prompt_phase import prompt_phase


REPEAT = "Repeat the previous context exactly."


def repeat_prompt(tokenizer, instruction: str = REPEAT) -> tuple[int, ...]:
    """Token ids of KVzip's repeat instruction for ``KVEvictionConfig.reread_prefix``: a user turn of the
    tokenizer's chat template and the assistant's turn opening (plain text after a blank line without one)."""
    if getattr(tokenizer, "chat_template", None):
        text = "\n" + tokenizer.apply_chat_template([{"role": "user", "content": instruction}],
                                                     add_generation_prompt=True, tokenize=False)
    else:
        text = f"\n\n{instruction}\n"
    return tuple(tokenizer(text, add_special_tokens=False).input_ids)


def reread_prompt(step: Callable[..., torch.Tensor], states: list[dict[str, torch.Tensor]],
                  rollback: Callable[[torch.Tensor], None], input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  positions: torch.Tensor, chunk_size: int, prefix: tuple[int, ...] = ()) -> None:
    """Score every cached prompt token by a chunked re-read of ``input_ids`` [B, L] (left-padded as for
    prefill; ``positions`` their position ids), each chunk after the ``prefix`` ids. ``states``: the cache
    layers, whose scores start at zero; ``rollback(keep)`` forgets all but each row's first ``keep`` tokens."""
    seen = states[0]["seen"].clone()
    for state in states:
        state["scores"].zero_()
    offset = positions.amax(-1, keepdim=True) + 1  # each row's real prompt length
    batch, length = input_ids.shape
    lead = torch.tensor(prefix, dtype=input_ids.dtype, device=input_ids.device).expand(batch, len(prefix))
    lead_positions = offset + torch.arange(len(prefix), device=input_ids.device)
    # chunks end at the prompt's end, as prefill's do: with left padding a row's chunks then hold the same
    # real tokens as when it runs alone
    for stop in range(length - (length - 1) // chunk_size * chunk_size, length + 1, chunk_size):
        start = max(stop - chunk_size, 0)
        mask = attention_mask[:, start:stop]
        if not bool(mask.any()):
            continue  # padding only
        with prompt_phase("reread"):  # cache steps read every key densely here, whatever the chunk's width
            step(torch.cat([lead, input_ids[:, start:stop]], 1), torch.cat([torch.ones_like(lead), mask], 1),
                 torch.cat([lead_positions, positions[:, start:stop] + offset + len(prefix)], 1), last_only=True)
        rollback(seen)
