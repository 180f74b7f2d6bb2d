"""Sparse attention: each chosen attention site attends only to the KV blocks its plan keeps."""
from __future__ import annotations

from dynasparse.export.sparse_attention import SPARSE_ATTENTION_TRANSLATIONS
from dynasparse.ir.ops import BLOCK_PLAN, BLOCK_SPARSE_ATTENTION
from dynasparse.passes.sparse_attention import SparseAttentionConfig, SparseAttentionPass
from dynasparse.registry import Stage, Technique, register


@register
class SparseAttention(Technique):
    name = "sparse_attention"
    config = SparseAttentionConfig
    pass_class = SparseAttentionPass
    stage = Stage.ATTENTION
    ops = (BLOCK_PLAN, BLOCK_SPARSE_ATTENTION)
    onnx_translations = SPARSE_ATTENTION_TRANSLATIONS
