"""The runtime side of the bounded KV cache: allocate each layer's slots, bind them, measure them.

The KV pass leaves a ``CachePlan`` on the graph module; ``KVCache`` sizes every layer for one generation
(batch, prompt + new tokens, the config's budgets) and binds the tensors as the graph's buffers, so the
graph's ``kv_cache_attention`` nodes update them in place, step after step, with no reallocation.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import torch

from dynasparse.errors import DynasparseError
from dynasparse.kernels.kv_cache import STATE_FIELDS, empty_state, priorities
from dynasparse.plans import CACHE_META, CachePlan, CacheSite

if TYPE_CHECKING:  # annotations only: the config reaches the runtime through the CachePlan
    from dynasparse.passes.kv_eviction import KVEvictionConfig


def cache_plan(graph_module: torch.fx.GraphModule) -> CachePlan:
    plan = graph_module.meta.get(CACHE_META)
    if plan is None:
        raise DynasparseError("this model has no KV cache: optimize it with a KVEvictionConfig (or pass the "
                              "plain model to dynasparse.generate, which does that)")
    return plan


class KVCache:
    """Every layer's cache state for one batch of sequences of up to ``seq_len`` tokens.

    Owned by whoever drives the steps: ``bind`` hands the tensors to a captured graph, which updates them
    in place; the ONNX Runtime runner feeds them in and stores the updated ones instead.
    """

    def __init__(self, sites: Sequence[CacheSite], config: KVEvictionConfig, batch: int, seq_len: int,
                 device: torch.device | str = "cpu", reserve: int = 0, prompt_len: int = 0):
        self.sites = tuple(sites)
        self.config, self.seq_len, self.reserve = config, seq_len, reserve
        evicting = [s for s in self.sites if s.policy != "full"]
        budgets = iter(config.capacities(len(evicting), seq_len) if evicting else [])
        self.capacities = [next(budgets) if s.policy != "full" else seq_len for s in self.sites]
        # ``reserve`` extra slots hold tokens that may be rolled back (drafts) until ``shrink`` evicts;
        # with ``compress="after_prefill"`` the prompt fits whole until ``compress`` evicts once
        held = prompt_len if config.compress == "after_prefill" else 0
        self.states = [empty_state(batch, s.num_kv_heads, max(capacity, held) + reserve, s.head_dim, s.value_dim,
                                   s.dtype, device) for s, capacity in zip(self.sites, self.capacities)]

    @classmethod
    def for_graph(cls, graph_module: torch.fx.GraphModule, batch: int, seq_len: int,
                  device: torch.device | str = "cpu", reserve: int = 0, prompt_len: int = 0) -> KVCache:
        """A cache sized by the graph's ``CachePlan`` and bound to it."""
        plan = cache_plan(graph_module)
        cache = cls(plan.sites, plan.config, batch, seq_len, device, reserve, prompt_len)
        cache.bind(graph_module)
        return cache

    def bind(self, graph_module: torch.fx.GraphModule) -> None:
        """Make these tensors the graph's cache buffers (the graph reads them by name on every call)."""
        for site, state in zip(self.sites, self.states):
            for field in STATE_FIELDS:
                setattr(graph_module, site.buffer(field), state[field])

    def rollback(self, keep: torch.Tensor) -> None:
        """Forget all but the first ``keep[b]`` tokens of each row b (drafts the full model rejected).

        Their slots become empty (position -1) and are the first reused. Exact as long as nothing was
        evicted since those tokens came in: the reserve slots and ``shrink`` see to that."""
        for state in self.states:
            state["positions"].masked_fill_(state["positions"] >= keep[:, None, None], -1)
            state["seen"].copy_(keep)

    def shrink(self) -> None:
        """Evict down to each layer's capacity, lowest priority first (the policy's scores; sinks and the
        recent window stay): run once the tokens in the reserve slots are final (verified drafts)."""
        for state, capacity in zip(self.states, self.capacities):
            self._shrink_one(state, capacity)

    def compress(self) -> bool:
        """Evict down to each layer's budget once (``shrink``) and move what stays into caches of budget
        slots, kept slots first in their order; True when a layer was resized (rebind the new tensors).
        Run after the prompt with ``compress="after_prefill"``: the scores have read all of it."""
        resized = False
        for i, (state, capacity) in enumerate(zip(self.states, self.capacities)):
            slots = capacity + self.reserve
            if state["keys"].shape[2] == slots + 1:
                continue
            self._shrink_one(state, capacity)
            order = (state["positions"] < 0).long().argsort(dim=-1, stable=True)[..., :slots]
            compact = {"seen": state["seen"]}
            for name in ("keys", "values", "positions", "scores"):
                tensor = state[name]
                index = order if tensor.dim() == 3 else order[..., None].expand(*order.shape, tensor.shape[-1])
                kept = tensor.gather(2, index)
                scratch = torch.full_like(kept[:, :, :1], -1) if name == "positions" else torch.zeros_like(kept[:, :, :1])
                compact[name] = torch.cat([kept, scratch], dim=2)
            self.states[i] = compact
            resized = True
        return resized

    def _shrink_one(self, state: dict[str, torch.Tensor], capacity: int) -> None:
        positions = state["positions"]
        valid = positions >= 0
        excess = (valid.sum(-1, keepdim=True) - capacity).clamp(min=0)
        if not bool(excess.any()):
            return
        priority = priorities(state["scores"], positions, state["seen"], self.config.sink, self.config.recent)
        priority = priority.masked_fill(~valid, math.inf)
        rank = priority.sort(dim=-1, stable=True).indices.argsort(dim=-1)
        positions.masked_fill_(valid & (rank < excess), -1)

    @property
    def allocated_bytes(self) -> int:
        """Bytes of K/V slots held (fixed for the whole generation)."""
        return sum(s["keys"][..., :-1, :].nbytes + s["values"][..., :-1, :].nbytes for s in self.states)

    def held_bytes(self) -> int:
        """Bytes of K/V in slots that hold a token now (counted on the device: one sync)."""
        total = 0
        for state in self.states:
            keys, values = state["keys"], state["values"]
            per_slot = keys.shape[-1] * keys.element_size() + values.shape[-1] * values.element_size()
            total += int((state["positions"] >= 0).sum()) * per_slot
        return total

    @property
    def full_bytes(self) -> int:
        """Bytes of K/V the full cache would hold for the same batch and sequence length."""
        return sum((s["keys"][..., :1, :].nbytes + s["values"][..., :1, :].nbytes) * self.seq_len for s in self.states)

    def used_bytes(self, real_tokens: list[int]) -> int:
        """Bytes of K/V in slots holding a token, for rows that have taken in ``real_tokens`` tokens each:
        grows until a layer's cache is full, then stays. Computed on the host (no device sync)."""
        total = 0
        for state, capacity in zip(self.states, self.capacities):
            keys, values = state["keys"], state["values"]
            per_head = keys.shape[-1] * keys.element_size() + values.shape[-1] * values.element_size()
            per_token = keys.shape[1] * per_head
            total += sum(min(capacity, n) for n in real_tokens) * per_token
        return total
