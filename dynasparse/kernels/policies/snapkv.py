"""SnapKV: the attention of a chunk's last queries, pooled so whole phrases stay."""
from __future__ import annotations

import torch.nn.functional as F

from dynasparse.kernels.policies.base import Policy, last_valid


class SnapKVPolicy(Policy):
    """SnapKV: the attention of the last ``window`` queries of each chunk, pooled over neighbouring new
    keys (kernel ``pool``) so whole phrases stay. In decode the window is the one new query."""

    name = "snapkv"

    def observe(self, query_valid, window):
        return last_valid(query_valid, window)

    def observed_tail(self, length, window):
        return min(window, length)

    def update(self, step):
        mass_new = step.mass_new
        if step.pool > 1:  # a single new key (a decode step) pools to itself
            batch, heads, length = mass_new.shape
            pooled = F.avg_pool1d(mass_new.reshape(batch * heads, 1, length), step.pool, stride=1,
                                  padding=step.pool // 2, count_include_pad=False)
            mass_new = pooled[..., :length].reshape(batch, heads, length)
        return step.mass_cache, mass_new
