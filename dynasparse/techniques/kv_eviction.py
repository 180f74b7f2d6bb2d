"""KV-cache eviction: a bounded cache around every causal attention site, owned by the runtime."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from dynasparse.config import BaseConfig
from dynasparse.errors import DynasparseError
from dynasparse.export.kv_cache import export_decoder_step
from dynasparse.ir.ops import (KV_CACHE_ATTENTION, KV_CACHE_ATTENTION_FUNCTIONAL, KV_CACHE_SPARSE_ATTENTION,
                               KV_TIERED_ATTENTION, KV_TIERED_SPARSE_ATTENTION)
from dynasparse.passes.kv_eviction import KVEvictionConfig, KVEvictionPass
from dynasparse.passes.token_merge import TokenMergeConfig
from dynasparse.plans import CACHE_META, KV_METADATA
from dynasparse.registry import Stage, Technique, register
from dynasparse.runtime.steps import OrtKVSteps


@register
class KVEviction(Technique):
    name = "kv_eviction"
    config = KVEvictionConfig
    pass_class = KVEvictionPass
    stage = Stage.CACHE
    ops = (KV_CACHE_ATTENTION, KV_CACHE_ATTENTION_FUNCTIONAL, KV_CACHE_SPARSE_ATTENTION, KV_TIERED_ATTENTION,
           KV_TIERED_SPARSE_ATTENTION)
    onnx_lowered = (KV_CACHE_ATTENTION_FUNCTIONAL,)

    def check_composition(self, config: BaseConfig, others: Sequence[BaseConfig]) -> None:
        for other in others:
            if isinstance(other, TokenMergeConfig):
                raise DynasparseError(f"{other} merges tokens of bidirectional (encoder) blocks and {config} "
                                      "caches causal (decoder) attention: no model has blocks both apply to")

    def export_onnx(self, model: Any, path: Path, args: tuple, kwargs: dict, opset_version: int) -> Path | None:
        if CACHE_META not in model.graph_module.meta:
            return None
        return export_decoder_step(model, path, args, kwargs, opset_version)

    def ort_steps(self, session: Any, configs: Sequence[BaseConfig], batch: int, seq_len: int,
                  new_tokens: int) -> Any:
        meta = session.session.get_modelmeta().custom_metadata_map.get(KV_METADATA)
        if meta is None:
            return None
        others = [c for c in configs if not isinstance(c, KVEvictionConfig)]
        if others:
            raise DynasparseError(f"an ONNX session runs the exported decode step as it is; {others[0]} needs the "
                                  "torch model: pass the model, not an ONNX session")
        kv = next((c for c in configs if isinstance(c, KVEvictionConfig)), None)
        return OrtKVSteps(session, json.loads(meta), kv, batch, seq_len, seq_len - new_tokens)
