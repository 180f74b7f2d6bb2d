"""Heavy hitters (H2O) and its per-observer mean (kvpress's ObservedAttention)."""
from __future__ import annotations

import torch

from dynasparse.kernels.policies.base import Policy


class H2OPolicy(Policy):
    """Heavy hitters: attention mass accumulated over every query so far, plus the recent window."""

    name = "h2o"

    def update(self, step):
        return step.scores + step.mass_cache, step.mass_new


class H2OMeanPolicy(Policy):
    """H2O with the accumulated mass divided by the number of queries that saw each token (kvpress's
    ObservedAttention): a token is not worth more for having been seen longer, so early tokens lose
    their head start. The score held is that mean."""

    name = "h2o_mean"

    def update(self, step):
        arrived = (step.new_positions >= 0).sum(-1, keepdim=True)  # real new tokens: each query saw them all
        seen_after = step.new_positions.amax(-1, keepdim=True) + 1
        observers_before = (seen_after - arrived - step.positions).clamp(min=0)
        mean = (step.scores * observers_before + step.mass_cache) / (seen_after - step.positions).clamp(min=1)
        return (torch.where(arrived > 0, mean, step.scores),
                step.mass_new / (seen_after - step.new_positions).clamp(min=1))
