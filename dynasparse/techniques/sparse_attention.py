"""Sparse attention: each chosen attention site attends only to the KV blocks its plan keeps."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from dynasparse.config import BaseConfig
from dynasparse.errors import DynasparseError
from dynasparse.export.sparse_attention import SPARSE_ATTENTION_TRANSLATIONS
from dynasparse.ir.ops import BLOCK_PLAN, BLOCK_SPARSE_ATTENTION, TOKEN_SPARSE_ATTENTION
from dynasparse.passes.exit_gate import ExitGateConfig
from dynasparse.passes.kv_eviction import KVEvictionConfig
from dynasparse.passes.sparse_attention import SparseAttentionConfig, SparseAttentionPass
from dynasparse.registry import Stage, Technique, register


@register
class SparseAttention(Technique):
    name = "sparse_attention"
    config = SparseAttentionConfig
    pass_class = SparseAttentionPass
    stage = Stage.ATTENTION
    ops = (BLOCK_PLAN, BLOCK_SPARSE_ATTENTION, TOKEN_SPARSE_ATTENTION)
    onnx_translations = SPARSE_ATTENTION_TRANSLATIONS

    def check_composition(self, config: BaseConfig, others: Sequence[BaseConfig]) -> None:
        later = [o for o in others if isinstance(o, (KVEvictionConfig, ExitGateConfig))]
        if config.token_keep is not None and later:
            raise DynasparseError(f"{config} leaves tokens out of whole layers' attention, which suits a model "
                                  f"called whole (prefill, a DiT step); {type(later[0]).__name__} reads every token "
                                  "of every layer: use the block selectors (keep_ratio, top_k, mass) with it")

    def export_onnx(self, model: Any, path: Path, args: tuple, kwargs: dict, opset_version: int) -> Path | None:
        if any(node.target is TOKEN_SPARSE_ATTENTION for node in model.graph_module.graph.nodes):
            raise DynasparseError("token_keep's selection has no ONNX spelling yet (it runs dense below "
                                  "min_seq_len, a branch on the length); export with the block selectors "
                                  "(keep_ratio, top_k, mass) or without SparseAttentionConfig")
        return None
