"""Steps of a KV-cache decoder: its cache, one step (eager, compiled, or in ONNX Runtime), prefill in chunks,
and what a run measured.

``generate``, self-speculative decoding and per-token exits all drive a decoder through these pieces:
``decoder_for`` captures a model once per config, ``TorchSteps`` owns one generation's ``KVCache`` and runs
a step of the captured graph (eager, or compiled
once per graph with ``torch.compile``), ``OrtKVSteps`` does the same for an exported step in ONNX Runtime,
``prefill`` feeds the prompt.
"""
from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch.fx._pytree import tree_flatten_spec

from dynasparse.api import OptimizedModel, optimize
from dynasparse.config import BaseConfig
from dynasparse.errors import DynasparseError
from dynasparse.kernels.prompt_phase import prompt_phase
from dynasparse.plans import CacheSite
from dynasparse.runtime.kv_cache import KVCache, cache_plan
from dynasparse.runtime.step_graph import step_graph
from dynasparse.runtime.reread import reread_prompt

_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
KEEP = "logits_to_keep"  # Hugging Face's causal LMs compute logits only at these positions


@dataclass
class GenerateStats:
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    cache_capacity: list[int] = field(default_factory=list)
    cache_allocated_bytes: int = 0  # every byte the cache holds while decoding (K/V, positions, scores)
    cache_prefill_bytes: int = 0  # held while the prompt is read (all of it with compress="after_prefill")
    cache_full_bytes: int = 0  # what the full cache would allocate for the same batch and length
    cache_used_bytes: list[int] = field(default_factory=list)  # after prefill, then after each step
    verify_steps: int = 0  # self-speculative decoding: full-model passes
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # of which the full model agreed with
    draft_rounds: dict[str, int] = field(default_factory=dict)  # rounds per drafter ("blocks 0..i"), and "plain"
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


def model_device(model: torch.nn.Module) -> torch.device:
    tensor = next(model.parameters(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def decoder_for(model: torch.nn.Module, configs: BaseConfig | Sequence[BaseConfig] = ()) -> OptimizedModel:
    """The model captured with a KV-cache graph and the other ``configs`` (exit gates, sparse attention):
    optimized once per (model, configs) and remembered. Without a ``KVEvictionConfig`` the cache is full.
    A model that takes ``logits_to_keep`` (Hugging Face causal LMs) is captured with it, so a prefill chunk
    computes logits for its last position only."""
    # deferred: runtime/ reads what passes leave (plans) and imports no pass module when it loads
    from dynasparse.passes.kv_eviction import KVEvictionConfig
    configs = [configs] if isinstance(configs, BaseConfig) else [c for c in configs if c is not None]
    if isinstance(model, OptimizedModel):
        plan = cache_plan(model.graph_module)
        asked = [c for c in configs if isinstance(c, KVEvictionConfig)]
        if asked and asked[0] != plan.config:
            raise DynasparseError(f"this model was optimized with {plan.config}; generate() got kv={asked[0]}. "
                                  "Pass the plain model to use another config, or leave kv out.")
        return model
    if not any(isinstance(c, KVEvictionConfig) for c in configs):
        configs.append(KVEvictionConfig(policy="full"))
    per_model = _DECODERS.setdefault(model, {})
    key = "".join(sorted(c.to_json() for c in configs))
    if key not in per_model:
        device = model_device(model)
        ids = torch.zeros(2, 8, dtype=torch.long, device=device)
        example = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                   "position_ids": torch.arange(8, device=device).expand(2, 8)}
        if KEEP in inspect.signature(model.forward).parameters:
            example[KEEP] = torch.arange(5, 8, device=device)  # a length export keeps dynamic
        per_model[key] = optimize(model, configs, example_kwargs=example)
    return per_model[key]


def logits_of(output) -> torch.Tensor:
    """The logits of an LM's output: ``.logits``, the first element of a tuple, or the tensor."""
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


def prompt_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded prompts: each row counts its own real tokens (padding gets 1, as in HF)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


def compile_mode(device: torch.device) -> str | None:
    """CUDA graphs on CUDA (the cache is static and a decode step has no host sync); Inductor on CPU."""
    return "reduce-overhead" if device.type == "cuda" else None


class CompiledStep:
    """``torch.compile`` of a decoder's step graph, shared by every generation with that decoder.

    The cache is passed in (``step_graph``), so parameters are the graph's only state and Inductor freezes
    them (constant weights, packed for its GEMMs). A prefill chunk compiles once for every length (the
    sequence dimension is dynamic), a decode step once; cache slots are dynamic, so a longer generation
    does not recompile either.
    """

    def __init__(self, decoder: torch.nn.Module, mode: str | None):
        plan = cache_plan(decoder.graph_module)
        module, _, _ = step_graph(decoder.graph_module, plan, functional=False)
        self.function = torch.compile(module, mode=mode, fullgraph=True)

    def __call__(self, flat: list[torch.Tensor], cache: list[torch.Tensor]) -> torch.Tensor:
        # fresh copies: a view's storage offset or a tensor made outside inference mode would each guard
        # (and recompile) the graph; the inputs are a few token ids
        flat = [tensor.clone() for tensor in flat]
        if flat[0].shape[1] > 1:
            for tensor in flat:
                if tensor.dim() == 2:
                    torch._dynamo.mark_dynamic(tensor, 1)
        with torch._inductor.config.patch(freezing=True):
            return self.function(*flat, *cache)


def compiled_step(decoder: torch.nn.Module, mode: str | None) -> CompiledStep:
    per_graph = _COMPILED.setdefault(decoder.graph_module, {})
    if mode not in per_graph:
        per_graph[mode] = CompiledStep(decoder, mode)
    return per_graph[mode]


class CacheSteps:
    """What steps over a ``KVCache`` share: the cache's sizes, and compressing it once the prompt is in."""

    cache: KVCache

    @property
    def capacities(self) -> list[int]:
        return self.cache.capacities

    @property
    def full_bytes(self) -> int:
        return self.cache.full_bytes

    @property
    def allocated_bytes(self) -> int:
        return self.cache.allocated_bytes

    def used_bytes(self, real_tokens: list[int]) -> int:
        return self.cache.used_bytes(real_tokens)

    def bind(self) -> None:
        """Hand the cache's current tensors to whatever runs the step (nothing to do where each call feeds them)."""

    def finish_prompt(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """The prompt is in: a policy that scores by re-reading it (KVzip) does so, then a cache that held
        all of it evicts down to its budget."""
        if self.cache.rereads:
            reread_prompt(self, self.cache.states, self.cache.rollback, input_ids, attention_mask,
                          prompt_positions(attention_mask), self.config.chunk_size, self.config.reread_prefix)
        if self.cache.compress():
            self.bind()


class TorchSteps(CacheSteps):
    """Steps of a captured KV-cache decoder: the graph updates this generation's ``KVCache`` in place.

    ``compile``: run the step through ``torch.compile`` (True: the device's mode, see ``compile_mode``; or
    a ``torch.compile`` mode name). ``reserve``: slots beyond the budget for tokens that may be rolled back.
    ``prompt_len``: with ``compress="after_prefill"``, the cache holds this many tokens until
    ``finish_prompt`` evicts down to the budget. ``shared``: run over the first layers of this cache
    instead of a cache of its own (a drafter made of the model's first blocks).
    """

    def __init__(self, decoder: torch.nn.Module, batch: int, seq_len: int, device: torch.device,
                 compile: bool | str = False, reserve: int = 0, prompt_len: int = 0, shared: KVCache | None = None):
        self.decoder = decoder
        if shared is None:
            self.cache = KVCache.for_graph(decoder.graph_module, batch, seq_len, device, reserve, prompt_len)
        else:
            self.cache = shared.first_layers(cache_plan(decoder.graph_module).sites)
        self.config = cache_plan(decoder.graph_module).config
        self.takes_keep = KEEP in decoder.layout.captured
        self.compiled = None
        if compile:
            self.compiled = compiled_step(decoder, compile_mode(device) if compile is True else compile)
        self.bind()

    def bind(self) -> None:
        """Hand the cache's tensors to the graph (eager) or to the compiled step's inputs."""
        self.cache.bind(self.decoder.graph_module)
        if self.compiled is not None:
            self.flat_cache = [tensor for state in self.cache.states for tensor in state.values()]
            for tensor in self.flat_cache:
                if tensor.dim() >= 3:
                    torch._dynamo.mark_dynamic(tensor, 2)  # slots: one graph for every cache size

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 last_only: bool = False) -> torch.Tensor:
        """Logits [B, T, V] of the new tokens (with ``last_only``: [B, 1, V], where the model allows it)."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        if self.takes_keep:
            length = input_ids.shape[1]
            kwargs[KEEP] = torch.arange(length - 1 if last_only else 0, length, device=input_ids.device)
        if self.compiled is None:
            logits = logits_of(self.decoder(**kwargs))
        else:
            args, kwargs = self.decoder.layout.arrange((), kwargs)
            flat = list(tree_flatten_spec((args, kwargs), self.decoder.graph_module._in_spec))
            logits = self.compiled(flat, self.flat_cache)
        return logits[:, -1:] if last_only else logits


class OrtKVSteps(CacheSteps):
    """Steps of an exported KV-cache decoder in ONNX Runtime: the ``KVCache`` lives here, each step feeds it
    in and keeps the updated cache that comes out (``layout``: the file's metadata, the cache's layout)."""

    def __init__(self, model, layout: dict, kv: BaseConfig | None, batch: int, seq_len: int, prompt_len: int = 0):
        self.config = BaseConfig.from_dict(layout["config"])
        if kv is not None and kv != self.config:
            raise DynasparseError(f"this ONNX file was exported with {self.config}; generate() got kv={kv}. "
                                  "Export again with that config, or leave kv out.")
        sites = [CacheSite(i, f"kv{i}", s["policy"], s["num_kv_heads"], s["head_dim"], s["value_dim"],
                           getattr(torch, s["dtype"]), s.get("role", "all"), tuple(s.get("heads", ())))
                 for i, s in enumerate(layout["sites"])]
        self.model = model
        self.cache = KVCache(sites, self.config, batch, seq_len, prompt_len=prompt_len)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 last_only: bool = False) -> torch.Tensor:
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        if KEEP in self.model.input_names:
            length = input_ids.shape[1]
            feeds[KEEP] = torch.arange(length - 1 if last_only else 0, length)
        for site, state in zip(self.cache.sites, self.cache.states):
            feeds.update({site.buffer(field): tensor for field, tensor in state.items()})
        outputs = dict(zip(self.model.output_names, self.model(**feeds)))
        for site, state in zip(self.cache.sites, self.cache.states):
            for name in state:
                state[name] = outputs[site.buffer(name) + "_out"]
        logits = outputs["output_0"]
        return logits[:, -1:] if last_only else logits


def prefill(step: Callable[..., torch.Tensor], input_ids: torch.Tensor, attention_mask: torch.Tensor, chunk_size: int,
            on_logits: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Run the prompt through the cache chunk by chunk (the first chunk may be short), then let the cache
    evict down to its budget (``finish_prompt``); return the last position's logits [B, V].

    ``on_logits(start, logits)`` sees every chunk's logits (perplexity evaluation reads them there); without
    it only the last position's logits are computed.
    """
    positions = prompt_positions(attention_mask)
    length = input_ids.shape[1]
    last = None
    # chunks end at the prompt's end: with left padding every row's chunk boundaries then fall on the same
    # real tokens as when the row runs alone, so eviction decisions (and outputs) do not depend on the batch
    with prompt_phase("read" if step.cache.rereads else None):  # a re-read sets the scores: none computed now
        for stop in range(length - (length - 1) // chunk_size * chunk_size, length + 1, chunk_size):
            start = max(stop - chunk_size, 0)
            logits = step(input_ids[:, start:stop], attention_mask[:, start:stop], positions[:, start:stop],
                          last_only=on_logits is None)
            if on_logits is not None:
                on_logits(start, logits)
            last = logits[:, -1]
    step.finish_prompt(input_ids, attention_mask)
    return last
