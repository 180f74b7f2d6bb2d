"""Token caching across denoising steps for diffusion transformers (RAS, ToCa, FORA's per-token form).

    patch embed [B, L, D] → gather_active(index) [B, A] → blocks, each attention = cached_attention
        → scatter_active(stream cache) [B, L, D] → final layer, unpatchify

Consecutive denoising steps of a DiT change most tokens little, and not the same ones: Region-Adaptive
Sampling (Liu et al., 2025) recomputes the tokens whose prediction is changing and lets the others keep
their last output. This is dKV-Cache's rewrite (the blocks run on the active tokens over cached keys and
values) with one more cache: the last block's output for every token, so the head, which reads the whole
patch grid, gets the fresh rows where they were computed and the cached ones elsewhere. ``dynasparse.sample``
chooses the active tokens per step (``runtime/token_cache.py``); called plainly, every token is active and
the graph is the model.
"""
from __future__ import annotations

import dataclasses

from dynasparse.config import BaseConfig, config_type
from dynasparse.errors import DynasparseError
from dynasparse.passes.delayed_kv import DelayedKVPass


@config_type
@dataclasses.dataclass
class TokenCacheConfig(BaseConfig):
    """Recompute a share of a DiT's tokens per denoising step, run by ``dynasparse.sample``.

    ``recompute_ratio``: the share of tokens a cached step recomputes, those whose noise prediction changed
    most over the last step (1.0: every token, which is the model). ``warmup``: the share of the first steps
    (the noisiest) that compute every token, as RAS does: the image's layout is still forming there.
    ``refresh_every``: every that many steps after the warmup, every token is recomputed and every cache
    refreshed, so no token's cache grows older than that.
    """

    recompute_ratio: float = 0.3
    warmup: float = 0.2
    refresh_every: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_range("recompute_ratio", 0.0, 1.0, low_open=True)
        self.check_range("warmup", 0.0, 1.0)
        self.check_int("refresh_every", 1)
        if self.layers is not None:
            raise DynasparseError("TokenCacheConfig runs every block on the active tokens, so layers= cannot "
                                  "restrict it; leave layers out")


class TokenCachePass(DelayedKVPass):
    name = "token_cache"
    whole_stream_out = True  # a DiT's head unpatchifies the whole grid

    def _describe(self, side: list[str]) -> str:
        return (f"token_cache: blocks run on the active tokens of each denoising step (the stream"
                f"{' and ' + ', '.join(side) if side else ''} gathered), over cached keys and values; the last "
                f"block's output is cached for every token; {self.config.recompute_ratio:.0%} of the tokens "
                f"recomputed per cached step, every token in the first {self.config.warmup:.0%} of the steps and "
                f"every {self.config.refresh_every} steps after")
