"""MLP skipping: learned per-token routers in front of blocks' MLPs, trained by ``dynasparse.fit``."""
from __future__ import annotations

from dynasparse.ir.ops import TOKEN_ROUTE
from dynasparse.passes.mlp_skip import MLPSkipConfig, MLPSkipPass
from dynasparse.registry import Stage, Technique, register


@register
class MLPSkip(Technique):
    name = "mlp_skip"
    config = MLPSkipConfig
    pass_class = MLPSkipPass
    stage = Stage.MLP
    ops = (TOKEN_ROUTE,)
    onnx_lowered = (TOKEN_ROUTE,)  # a matmul and a comparison: traced as torch ops
