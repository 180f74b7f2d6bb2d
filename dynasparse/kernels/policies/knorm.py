"""Key norm: large keys draw little attention."""
from __future__ import annotations

from dynasparse.kernels.policies.base import Policy


class KNormPolicy(Policy):
    """Key norm (Devoto et al. 2024, kvpress's KnormPress): keys with a small L2 norm draw the most
    attention, so the largest-norm keys leave first. Needs no attention weights, so it runs with any kernel."""

    name = "knorm"
    uses_attention = False

    def update(self, step):
        return step.scores, -step.new_keys.float().norm(dim=-1)
