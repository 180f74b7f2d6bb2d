"""KVzip: a token is worth the most attention any query paid it while the model re-read the prompt."""
from __future__ import annotations

import torch

from dynasparse.kernels.policies.base import Policy


class KVzipPolicy(Policy):
    """KVzip (Kim et al. 2025, kvpress's KVzipPress): after the prompt, the runtime feeds the prompt again
    in chunks (``KVCache.reread``) and each cached token keeps the most attention any of those queries paid
    it (max over the group's query heads and the queries). A model that can reproduce its context from
    the kept tokens has kept what any later question may need, so the score is question-agnostic.

    Outside the re-read (decode, or a cache that evicts every chunk) the score keeps taking the max over
    the queries that come, so the policy also runs alone, as a max-attention heavy-hitter rule.
    """

    name = "kvzip"
    reduce = "max"
    rereads_prompt = True

    def update(self, step):
        return torch.maximum(step.scores, step.mass_cache), step.mass_new
