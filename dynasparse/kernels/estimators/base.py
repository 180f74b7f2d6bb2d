"""What every estimator is given, so ``build_plan`` calls them all alike."""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch


@dataclasses.dataclass(frozen=True)
class EstimatorInputs:
    """One attention call as the plan sees it. ``q`` [B, Hq, Lq, D], ``k`` [B, Hkv, Lk, D]; ``mask`` the call's
    own mask (bool or additive, broadcastable to [B, Hq, Lq, Lk]); ``key_valid`` [B, Lk] bool, the keys some
    query may see (None: all); ``scale`` already resolved; ``window`` the probe queries of ``vertical_slash``."""

    q: torch.Tensor
    k: torch.Tensor
    mask: torch.Tensor | None
    key_valid: torch.Tensor | None
    is_causal: bool
    block_size: int
    scale: float
    window: int


# Scores every (query block, KV block) pair with an estimate of the log of its attention mass:
# [B, Hkv, NQ, NK] fp32, or a shape that broadcasts to it; -inf for a block never to choose.
Estimator = Callable[[EstimatorInputs], torch.Tensor]
