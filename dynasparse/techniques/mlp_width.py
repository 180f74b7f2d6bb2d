"""MLP width: per token, the MLP's matmuls read only the input channels above a fitted magnitude (TEAL)."""
from __future__ import annotations

from dynasparse.ir.ops import CHANNEL_SPARSIFY, ROW_SPARSE_LINEAR
from dynasparse.passes.mlp_width import MLPWidthConfig, MLPWidthPass
from dynasparse.registry import Stage, Technique, register


@register
class MLPWidth(Technique):
    name = "mlp_width"
    config = MLPWidthConfig
    pass_class = MLPWidthPass
    stage = Stage.MLP_CHANNELS
    ops = (CHANNEL_SPARSIFY, ROW_SPARSE_LINEAR)
    onnx_lowered = (CHANNEL_SPARSIFY, ROW_SPARSE_LINEAR)  # a select and a matmul: traced as torch ops
