"""No eviction, and StreamingLLM: policies that read nothing but positions."""
from __future__ import annotations

from dynasparse.kernels.policies.base import Policy


class FullPolicy(Policy):
    """No eviction: the runtime sizes the cache to hold every token. The reference for the others."""

    name = "full"
    uses_attention = False

    def update(self, step):
        return step.positions.float(), step.new_positions.float()


class StreamingPolicy(FullPolicy):
    """StreamingLLM: sinks + the recent window; everything else leaves oldest first."""

    name = "streaming"
