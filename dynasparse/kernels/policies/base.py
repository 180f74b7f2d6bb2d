"""The policy interface: which queries a step observes, how their attention is pooled, what a candidate is worth."""
from __future__ import annotations

from typing import ClassVar

import torch

from dynasparse.kernels.policies.candidates import Candidates


class Policy:
    """Scores cache candidates. ``observe`` says which queries the score reads; ``update`` turns a step's
    ``Candidates`` into scores (accumulated, or afresh). ``reduce`` says how the observed queries'
    attention becomes one mass per key: ``"sum"`` (what they paid in total) or ``"max"`` (the most any
    one of them paid: a token one query needs is not outvoted by many that ignore it)."""

    name: ClassVar[str]
    uses_attention: ClassVar[bool] = True  # the step computes the observed queries' attention masses
    reduce: ClassVar[str] = "sum"
    rereads_prompt: ClassVar[bool] = False  # the runtime scores the prompt by re-reading it (KVzip)

    def observe(self, query_valid: torch.Tensor, window: int) -> torch.Tensor:
        """[B, T] weights of the new queries whose attention is observed (all real queries by default)."""
        return query_valid.float()

    def observed_tail(self, length: int, window: int) -> int:
        """How many of ``length`` unpadded new queries ``observe`` weighs: always the last ones."""
        return length

    def masses(self, probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """[B, Hkv, N] from softmax ``probs`` [B, Hkv, G*T, N] and query ``weights`` broadcastable to them."""
        weighted = probs * weights
        return weighted.amax(2) if self.reduce == "max" else weighted.sum(2)

    def update(self, step: Candidates) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores of the slots [B, Hkv, S], scores of the new tokens [B, Hkv, T])."""
        raise NotImplementedError


def last_valid(query_valid: torch.Tensor, count: int) -> torch.Tensor:
    """[B, T] weights: 1 on each row's last ``count`` real queries."""
    from_end = query_valid.flip(-1).long().cumsum(-1).flip(-1)  # 1 on the last real query, 2 before it...
    return (query_valid & (from_end <= count)).float()
