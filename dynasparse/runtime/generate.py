"""``dynasparse.generate``: chunked prefill and a decode loop over a bounded, batched KV cache.

Each row of a batch is its own sequence: prompts are left-padded, every row has its own positions, cache
slots and eviction decisions, so a batched row generates exactly what it generates alone. The model is
captured once without a cache and rewritten by the KV pass (``KVEvictionConfig``); the cache lives in
``KVCache`` and is updated in place by the graph, with no host sync inside a step.
"""
from __future__ import annotations

import sys
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch

from dynasparse.api import OptimizedModel, optimize
from dynasparse.config import ExitGateConfig, KVEvictionConfig
from dynasparse.errors import DynasparseError
from dynasparse.runtime.kv_cache import KVCache, cache_plan

_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class GenerateStats:
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    cache_capacity: list[int] = field(default_factory=list)
    cache_allocated_bytes: int = 0
    cache_used_bytes: list[int] = field(default_factory=list)  # after prefill, then after each step
    verify_steps: int = 0  # self-speculative decoding: full-model passes
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # of which the full model agreed with
    blocks_per_token: float = 0.0  # per-token exits: mean blocks run per decoded token

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """Generated tokens per second per row, decode steps only."""
        return self.new_tokens / self.decode_seconds if self.decode_seconds else 0.0


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # [B, prompt + new]: the prompt (as given) then the new tokens
    stats: GenerateStats


def decoder_for(model: torch.nn.Module, kv: KVEvictionConfig | None,
                gates: ExitGateConfig | None = None) -> OptimizedModel:
    """The model with a KV-cache graph (and exit ``gates``, or cut after the gate of a drafter): optimized
    once per (model, configs) and remembered."""
    if isinstance(model, OptimizedModel):
        plan = cache_plan(model.graph_module)
        if kv is not None and kv != plan.config:
            raise DynasparseError(f"this model was optimized with {plan.config}; generate() got kv={kv}. "
                                  "Pass the plain model to use another config, or leave kv out.")
        return model
    kv = kv or KVEvictionConfig(policy="full")
    per_model = _DECODERS.setdefault(model, {})
    key = kv.to_json() + (gates.to_json() if gates is not None else "")
    if key not in per_model:
        ids = torch.zeros(1, 8, dtype=torch.long, device=_device(model))
        example = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                   "position_ids": torch.arange(8, device=ids.device)[None]}
        per_model[key] = optimize(model, [gates, kv] if gates is not None else kv, example_kwargs=example)
    return per_model[key]


def _device(model: torch.nn.Module) -> torch.device:
    tensor = next(model.parameters(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def logits_of(output) -> torch.Tensor:
    """The logits of a causal LM's output: ``.logits``, the first element of a tuple, or the tensor."""
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


def prompt_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded prompts: each row counts its own real tokens (padding gets 1, as in HF)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


class TorchSteps:
    """Steps of a captured KV-cache decoder: the graph updates its bound ``KVCache`` in place."""

    def __init__(self, decoder: OptimizedModel, batch: int, seq_len: int, device: torch.device):
        self.decoder = decoder
        self.cache = KVCache.for_graph(decoder.graph_module, batch, seq_len, device)
        self.config = cache_plan(decoder.graph_module).config
        self.capacities = self.cache.capacities
        self.allocated_bytes = self.cache.allocated_bytes

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor) -> torch.Tensor:
        return logits_of(self.decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids))

    def used_bytes(self, real_tokens: list[int]) -> int:
        return self.cache.used_bytes(real_tokens)


def steps_for(model, kv: KVEvictionConfig | None, batch: int, seq_len: int, device: torch.device,
              gates: ExitGateConfig | None = None, new_tokens: int = 1):
    """The step function for ``model``: a torch module (captured and rewritten once, with per-token exit
    ``gates`` if given) or an ONNX Runtime session of an exported KV-cache decoder."""
    from dynasparse.runtime.ort import OrtKVSteps, OrtModel

    if isinstance(model, OrtModel):
        if gates is not None:
            raise DynasparseError("per-token exits run torch modules; pass the model, not an ONNX session")
        return OrtKVSteps(model, kv, batch, seq_len)
    if gates is not None:
        from dynasparse.runtime.token_exit import TokenExitSteps

        return TokenExitSteps(decoder_for(model, kv, gates), batch, seq_len, device, new_tokens)
    return TorchSteps(decoder_for(model, kv), batch, seq_len, device)


def prefill(step: Callable[..., torch.Tensor], input_ids: torch.Tensor, attention_mask: torch.Tensor, chunk_size: int,
            on_logits: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Run the prompt through the cache chunk by chunk (the first chunk may be short); return the last
    position's logits [B, V].

    ``on_logits(start, logits)`` sees every chunk's logits (perplexity evaluation reads them there).
    """
    positions = prompt_positions(attention_mask)
    length = input_ids.shape[1]
    last = None
    # chunks end at the prompt's end: with left padding every row's chunk boundaries then fall on the same
    # real tokens as when the row runs alone, so eviction decisions (and outputs) do not depend on the batch
    for stop in range(length - (length - 1) // chunk_size * chunk_size, length + 1, chunk_size):
        start = max(stop - chunk_size, 0)
        logits = step(input_ids[:, start:stop], attention_mask[:, start:stop], positions[:, start:stop])
        if on_logits is not None:
            on_logits(start, logits)
        last = logits[:, -1]
    return last


def next_token(logits: torch.Tensor, temperature: float, top_p: float,
               generator: torch.Generator | None) -> torch.Tensor:
    """Greedy at temperature 0; otherwise sample from the temperature-scaled nucleus (top_p)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = (logits.float() / temperature).softmax(-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest prefix reaching top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class _Progress:
    """One stderr line, rewritten in place: tokens so far, tokens/s, cache bytes."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.start = total, enabled, time.perf_counter()

    def update(self, done: int, cache_bytes: int) -> None:
        if not self.enabled or (done % 16 and done != self.total):
            return
        rate = done / max(time.perf_counter() - self.start, 1e-9)
        sys.stderr.write(f"\rgenerate: {done}/{self.total} tokens, {rate:.1f} tok/s, "
                         f"cache {cache_bytes / 2**20:.1f} MiB")
        if done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


@torch.no_grad()
def generate(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             max_new_tokens: int = 32, kv: KVEvictionConfig | None = None, temperature: float = 0.0,
             top_p: float = 1.0, eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             stream: Callable[[torch.Tensor], None] | None = None, progress: bool | None = None,
             generator: torch.Generator | None = None, early_exit: ExitGateConfig | None = None) -> GenerateOutput:
    """Generate up to ``max_new_tokens`` per row with a bounded KV cache (``kv``; default: the full cache).

    ``model``: a causal LM module (captured once per config and remembered), an ``OptimizedModel`` with a
    KV cache, or ``dynasparse.ort_session`` of one exported with ``export_onnx``.
    ``input_ids`` [B, P] are left-padded where ``attention_mask`` is 0. Rows that produce an
    ``eos_token_id`` stop; their later tokens are ``pad_token_id`` (default: the first eos id, else 0).
    ``stream(tokens [B])`` is called after every step; ``progress`` prints a live line on stderr
    (default: on for 256+ new tokens in a terminal).
    ``early_exit=ExitGateConfig(...)``: per-token exits (CALM): a token whose gate is confident takes the
    gate's prediction, and later layers' KV are filled from its hidden state. With ``mode="draft"``:
    self-speculative decoding (greedy only): the model's first blocks and its own head draft tokens, the
    full model verifies them in one pass and keeps the longest agreeing prefix, so the output is exactly
    the plain greedy output.
    """
    if input_ids.dim() != 2:
        raise DynasparseError(f"input_ids must be [batch, prompt_len], got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise DynasparseError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if temperature < 0 or not 0 < top_p <= 1:
        raise DynasparseError(f"temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")
    batch, prompt_len = input_ids.shape
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device)
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    if early_exit is not None and early_exit.mode == "draft":
        from dynasparse.runtime.speculative import self_speculative

        return self_speculative(model, input_ids, attention_mask, max_new_tokens, early_exit, kv, temperature, eos,
                                pad, stream)
    if early_exit is not None and early_exit.mode != "staged":
        raise DynasparseError(f"generate(early_exit=...) takes mode='staged' (per-token exits) or 'draft' "
                              f"(self-speculative decoding), not {early_exit.mode!r}")

    step_fn = steps_for(model, kv, batch, prompt_len + max_new_tokens, input_ids.device, early_exit, max_new_tokens)
    stats = GenerateStats(prompt_len, 0, cache_capacity=step_fn.capacities,
                          cache_allocated_bytes=step_fn.allocated_bytes)
    begin = time.perf_counter()
    logits = prefill(step_fn, input_ids, attention_mask, step_fn.config.chunk_size)
    stats.prefill_seconds = time.perf_counter() - begin
    positions = attention_mask.long().sum(-1)
    real_tokens = positions.tolist()
    stats.cache_used_bytes.append(step_fn.used_bytes(real_tokens))

    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    eos_ids = torch.tensor(eos, dtype=torch.long, device=input_ids.device)
    produced = []
    show = progress if progress is not None else (max_new_tokens >= 256 and sys.stderr.isatty())
    bar = _Progress(max_new_tokens, show)
    begin = time.perf_counter()
    for step in range(max_new_tokens):
        token = next_token(logits, temperature, top_p, generator)
        token = torch.where(finished, torch.full_like(token, pad), token)
        produced.append(token)
        if stream is not None:
            stream(token)
        finished |= torch.isin(token, eos_ids)
        stats.new_tokens = step + 1
        if step + 1 == max_new_tokens or (eos and bool(finished.all())):
            break
        logits = step_fn(token[:, None], torch.ones_like(token)[:, None], positions[:, None])[:, -1]
        positions = positions + 1
        real_tokens = [n + 1 for n in real_tokens]
        stats.cache_used_bytes.append(step_fn.used_bytes(real_tokens))
        bar.update(step + 1, stats.cache_used_bytes[-1])
    stats.decode_seconds = time.perf_counter() - begin
    blocks_run = getattr(step_fn, "blocks_run", None)
    if blocks_run:
        stats.blocks_per_token = sum(blocks_run) / len(blocks_run)
    bar.update(max_new_tokens, stats.cache_used_bytes[-1])
    return GenerateOutput(torch.cat([input_ids, torch.stack(produced, dim=1)], dim=1), stats)
