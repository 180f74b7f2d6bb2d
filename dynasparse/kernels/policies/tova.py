"""TOVA: the newest query decides."""
from __future__ import annotations

from dynasparse.kernels.policies.base import Policy, last_valid


class TOVAPolicy(Policy):
    """TOVA: the attention of the newest query only; the lowest is dropped."""

    name = "tova"

    def observe(self, query_valid, window):
        return last_valid(query_valid, 1)

    def observed_tail(self, length, window):
        return 1

    def update(self, step):
        return step.mass_cache, step.mass_new
