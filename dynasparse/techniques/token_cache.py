"""Token caching for diffusion transformers: a share of the tokens recomputed per denoising step, run by
``dynasparse.sample`` (the graph's runner is dKV-Cache's: the same caches, plus the whole stream)."""
from __future__ import annotations

from typing import Sequence

from dynasparse.config import BaseConfig
from dynasparse.errors import DynasparseError
from dynasparse.ir.ops import CACHED_ATTENTION, GATHER_ACTIVE, SCATTER_ACTIVE
from dynasparse.passes.token_cache import TokenCacheConfig, TokenCachePass
from dynasparse.registry import Stage, Technique, register


@register
class TokenCache(Technique):
    name = "token_cache"
    config = TokenCacheConfig
    pass_class = TokenCachePass
    stage = Stage.CACHE
    ops = (GATHER_ACTIVE, CACHED_ATTENTION, SCATTER_ACTIVE)

    def check_composition(self, config: BaseConfig, others: Sequence[BaseConfig]) -> None:
        if others:
            raise DynasparseError(f"{config} runs a DiT's blocks on each step's active tokens over its own caches; "
                                  f"it does not compose with {type(others[0]).__name__} yet: optimize with "
                                  "TokenCacheConfig alone")
