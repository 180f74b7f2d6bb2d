"""Which tokens each denoising step recomputes over a ``TokenCacheConfig`` graph (Region-Adaptive Sampling).

RAS (Liu et al., 2025) recomputes where the model's prediction is moving: a token whose noise prediction
changed most over the last step is the one whose cached output is going stale fastest. The first steps lay
out the image and compute every token (``warmup``); after them, every ``refresh_every``-th step recomputes
every token, so a token left out keeps its cache for fewer than that many steps.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dynasparse.config import BaseConfig


class ActiveTokens:
    """Per step: the token positions [B, A] to compute (None: every token), from the predictions so far."""

    def __init__(self, config: BaseConfig, steps: int, length: int):
        self.length = length
        self.count = max(1, round(config.recompute_ratio * length))
        self.warmup = math.ceil(config.warmup * steps)
        self.refresh_every = config.refresh_every
        self.last: torch.Tensor | None = None  # the prediction of the previous step
        self.change: torch.Tensor | None = None  # [B, L]: how much each token's prediction moved over it

    def full(self, step: int) -> bool:
        """Whether ``step`` computes every token: the warmup, a refresh, or no measured change yet."""
        if step < self.warmup or self.change is None or self.count >= self.length:
            return True
        return (step - self.warmup) % self.refresh_every == self.refresh_every - 1

    def choose(self, step: int) -> torch.Tensor | None:
        if self.full(step):
            return None
        return self.change.topk(self.count, dim=1).indices.sort(dim=1).values

    def observe(self, prediction: torch.Tensor) -> None:
        """Record a step's noise prediction [B, C, H, W]; a token's change is the mean absolute change over
        its patch's pixels and channels (tokens in the patch embedding's row-major order)."""
        if self.last is not None:
            moved = (prediction - self.last).abs().mean(dim=1, keepdim=True).float()
            patch = math.isqrt(moved.shape[-2] * moved.shape[-1] // self.length)
            self.change = F.avg_pool2d(moved, patch).flatten(1)
        self.last = prediction
