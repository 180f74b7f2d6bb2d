"""``dynasparse.generate``: chunked prefill and a decode loop over a bounded, batched KV cache.

Each row of a batch is its own sequence: prompts are left-padded, every row has its own positions, cache
slots and eviction decisions, so a batched row generates exactly what it generates alone. The model is
captured once without a cache and rewritten by the KV pass (``KVEvictionConfig``); the cache lives in
``KVCache`` and is updated in place by the graph, with no host sync inside a step.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from dynasparse.config import BaseConfig
from dynasparse.errors import DynasparseError
from dynasparse.registry import first, technique_for
from dynasparse.runtime.ort import OrtModel
from dynasparse.runtime.steps import GenerateOutput, GenerateStats, TorchSteps, decoder_for, prefill


def steps_for(model, configs: Sequence[BaseConfig], batch: int, seq_len: int, device: torch.device,
              new_tokens: int = 1, compile: bool | str = False):
    """The step function for ``model``: a torch module (captured and rewritten once with ``configs``; a
    technique that changes decoding steps, such as per-token exits, supplies its own) or an ONNX Runtime
    session of an exported decode step."""
    if isinstance(model, OrtModel):
        if compile:
            raise DynasparseError("compile=True compiles torch modules; pass the model, not an ONNX session")
        steps = first("ort_steps", model, configs, batch, seq_len, new_tokens)
        if steps is None:
            raise DynasparseError("this ONNX file has no KV cache; export a model optimized with "
                                  "KVEvictionConfig (or pass the torch model to generate)")
        return steps
    decoder = decoder_for(model, configs)
    return (first("decode_steps", decoder, batch, seq_len, device, new_tokens, compile)
            or TorchSteps(decoder, batch, seq_len, device, compile, prompt_len=seq_len - new_tokens))


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


@torch.no_grad()
def generate(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             max_new_tokens: int = 32, kv: BaseConfig | None = None, temperature: float = 0.0,
             top_p: float = 1.0, eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             stream: Callable[[torch.Tensor], None] | None = None, progress: bool | None = None,
             generator: torch.Generator | None = None, early_exit: BaseConfig | None = None,
             configs: Sequence[BaseConfig] = (), compile: bool | str = False) -> GenerateOutput:
    """Generate up to ``max_new_tokens`` per row with a bounded KV cache (``kv``; default: the full cache).

    ``model``: a causal LM module (captured once per config and remembered), an ``OptimizedModel`` with a
    KV cache, or ``dynasparse.ort_session`` of one exported with ``export_onnx``.
    ``input_ids`` [B, P] are left-padded where ``attention_mask`` is 0. Rows that produce an
    ``eos_token_id`` stop; their later tokens are ``pad_token_id`` (default: the first eos id, else 0).
    ``stream(tokens [B])`` is called after every step; ``progress`` shows a tqdm bar on stderr with the
    cache in use (default: on for 256+ new tokens in a terminal).
    ``early_exit=ExitGateConfig(...)``: per-token exits (CALM): a token whose gate is confident takes the
    gate's prediction, and later layers' KV are filled from its hidden state. With ``mode="draft"``:
    self-speculative decoding (greedy only): the model's first blocks and its own head draft tokens, the
    full model verifies them in one pass and keeps the longest agreeing prefix, so the output is exactly
    the plain greedy output.
    ``configs``: further passes for the decoder, e.g. ``SparseAttentionConfig`` for sparse prefill chunks.
    ``compile``: the prefill-chunk and decode-step graphs go through ``torch.compile`` once each (Inductor
    with frozen weights on CPU, CUDA graphs on CUDA; or a ``torch.compile`` mode name); the first call pays
    the compilation.
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
    configs = [c for c in (kv, early_exit, *configs) if c is not None]
    for config in configs:
        driver = technique_for(config).generation_driver(config)
        if driver is not None:  # a technique with a decoding loop of its own (self-speculative decoding)
            return driver(model, input_ids, attention_mask, max_new_tokens, config,
                          [c for c in configs if c is not config], temperature, eos, pad, stream, compile)
    step_fn = steps_for(model, configs, batch, prompt_len + max_new_tokens, input_ids.device, max_new_tokens,
                        compile)
    stats = GenerateStats(prompt_len, 0, cache_capacity=step_fn.capacities,
                          cache_prefill_bytes=step_fn.allocated_bytes, cache_full_bytes=step_fn.full_bytes)
    begin = time.perf_counter()
    logits = prefill(step_fn, input_ids, attention_mask, step_fn.config.chunk_size)
    stats.prefill_seconds = time.perf_counter() - begin
    stats.cache_allocated_bytes = step_fn.allocated_bytes
    positions = attention_mask.long().sum(-1)
    real_tokens = positions.tolist()
    stats.cache_used_bytes.append(step_fn.used_bytes(real_tokens))

    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    eos_ids = torch.tensor(eos, dtype=torch.long, device=input_ids.device)
    produced = []
    show = progress if progress is not None else (max_new_tokens >= 256 and sys.stderr.isatty())
    bar = tqdm(total=max_new_tokens, desc="generate", unit="tok", file=sys.stderr, disable=not show)
    begin = time.perf_counter()
    for step in range(max_new_tokens):
        token = next_token(logits, temperature, top_p, generator)
        token = torch.where(finished, torch.full_like(token, pad), token)
        produced.append(token)
        if stream is not None:
            stream(token)
        finished |= torch.isin(token, eos_ids)
        stats.new_tokens = step + 1
        bar.update(1)
        if step + 1 == max_new_tokens or (eos and bool(finished.all())):
            break
        logits = step_fn(token[:, None], torch.ones_like(token)[:, None], positions[:, None], last_only=True)[:, -1]
        positions = positions + 1
        real_tokens = [n + 1 for n in real_tokens]
        stats.cache_used_bytes.append(step_fn.used_bytes(real_tokens))
        bar.set_postfix_str(f"cache {stats.cache_used_bytes[-1] / 2**20:.1f} MiB", refresh=False)
    stats.decode_seconds = time.perf_counter() - begin
    bar.close()
    blocks_run = getattr(step_fn, "blocks_run", None)
    if blocks_run:
        stats.blocks_per_token = sum(blocks_run) / len(blocks_run)
    return GenerateOutput(torch.cat([input_ids, torch.stack(produced, dim=1)], dim=1), stats)
