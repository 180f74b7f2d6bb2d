"""The caches of a dKV graph (``DelayedKVConfig``, ``TokenCacheConfig``), bound as its buffers for each call.

A plain call binds every position as active over empty caches, so it returns the model's own output. A
sampler opens a session (``start``) that keeps the caches across calls and sets ``active`` before each
denoising step's call: the positions that step computes (None: every position, which refreshes the caches).
"""
from __future__ import annotations

import torch
from torch.fx._pytree import tree_flatten_spec

from dynasparse.plans import DELAYED_KV_META, DelayedKVPlan


class DelayedKVModel(torch.nn.Module):
    """The dKV graph module and the caches it reads and writes."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__()
        self.graph_module = gm
        self.plan: DelayedKVPlan = gm.meta[DELAYED_KV_META]
        self.in_session = False
        self.active: torch.Tensor | None = None

    def length_of(self, *args, **kwargs) -> int:
        """The sequence length a call with these inputs runs its blocks over (a DiT: its patch count)."""
        return self._shape(args, kwargs)[1]

    def _shape(self, args: tuple, kwargs: dict) -> tuple[int, int, torch.device]:
        flat = tree_flatten_spec((args, kwargs), self.graph_module._in_spec)
        first = next(x for x in flat if torch.is_tensor(x))
        return first.shape[0], self.plan.length.of(flat), first.device

    def start(self, batch: int, length: int, device: torch.device | str = "cpu") -> None:
        """Empty caches for ``batch`` rows of ``length`` tokens, kept until ``stop``."""
        self._allocate(batch, length, device)
        self.in_session = True

    def _allocate(self, batch: int, length: int, device: torch.device | str) -> None:
        gm = self.graph_module
        for (keys, values), heads, dims in zip(self.plan.caches, self.plan.kv_heads, self.plan.head_dims):
            for name, dim in zip((keys, values), dims):
                dtype = getattr(gm, name).dtype
                setattr(gm, name, torch.zeros(batch, heads, length, dim, dtype=dtype, device=device))
        if self.plan.stream_cache is not None:
            dtype = getattr(gm, self.plan.stream_cache).dtype
            setattr(gm, self.plan.stream_cache, torch.zeros(batch, length, self.plan.stream_dim, dtype=dtype,
                                                            device=device))

    def stop(self) -> None:
        self.in_session, self.active = False, None

    def forward(self, *args, **kwargs):
        batch, length, device = self._shape(args, kwargs)
        if not self.in_session:
            self._allocate(batch, length, device)
        index = self.active if self.in_session and self.active is not None else (
            torch.arange(length, device=device).expand(batch, length))
        setattr(self.graph_module, self.plan.index, index)
        return self.graph_module(*args, **kwargs)
