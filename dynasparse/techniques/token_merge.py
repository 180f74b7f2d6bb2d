"""Token merging: fewer tokens per encoder block, merged between attention and MLP, unmerged at the end."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from dynasparse.config import BaseConfig
from dynasparse.errors import DynasparseError
from dynasparse.export.token_merge import TOKEN_MERGE_TRANSLATIONS
from dynasparse.ir.ops import CLS_IMPORTANCE, MERGE_BIAS, MERGE_INIT, MERGE_TOKENS, UNMERGE
from dynasparse.passes.exit_gate import ExitGateConfig
from dynasparse.passes.sparse_attention import SparseAttentionConfig
from dynasparse.passes.timestep_bands import finish_graph
from dynasparse.passes.token_merge import TokenMergeConfig, TokenMergePass
from dynasparse.plans import MERGE_GATE
from dynasparse.registry import Stage, Technique, register
from dynasparse.runtime.merge_gate import MergeGatedModel, dense_module


@register
class TokenMerge(Technique):
    name = "token_merge"
    config = TokenMergeConfig
    pass_class = TokenMergePass
    stage = Stage.TOKENS
    ops = (MERGE_INIT, MERGE_TOKENS, MERGE_BIAS, UNMERGE, CLS_IMPORTANCE)
    onnx_translations = TOKEN_MERGE_TRANSLATIONS  # merge_tokens: a data-dependent plan
    onnx_lowered = (MERGE_INIT, MERGE_BIAS, UNMERGE, CLS_IMPORTANCE)

    def check_composition(self, config: BaseConfig, others: Sequence[BaseConfig]) -> None:
        for other in others:
            if config.timestep_schedule is not None and not isinstance(other, (TokenMergeConfig,
                                                                                SparseAttentionConfig)):
                raise DynasparseError(f"{config}: a timestep schedule picks a graph per band inside the graph; "
                                      f"it composes with sparse attention only, not with {type(other).__name__}")
            if config.dense_below and isinstance(other, ExitGateConfig):
                raise DynasparseError(f"{config}: dense_below chooses between two graphs per call and {other} "
                                      "splits one graph into stages; leave dense_below at 0 with exit gates")

    def finish_graph(self, graph_module: torch.fx.GraphModule) -> torch.fx.GraphModule:
        return finish_graph(graph_module)  # token density by timestep: one graph picks the band

    def runner(self, graph_module: torch.fx.GraphModule) -> torch.nn.Module | None:
        return MergeGatedModel(graph_module) if MERGE_GATE in graph_module.meta else None

    def compile_graph(self, graph_module: torch.fx.GraphModule, example_inputs: list,
                      notes: list[str]) -> torch.fx.GraphModule:
        """``dense_below`` is decided once per compiled graph, from the shapes Dynamo compiles for."""
        gate = graph_module.meta.get(MERGE_GATE)
        if gate is None or gate.worth_merging(example_inputs):
            return graph_module
        notes.append(f"token_merge: compiled dense, the example batch has {gate.mergeable_tokens(example_inputs)} "
                     f"mergeable tokens (dense_below={gate.dense_below})")
        return dense_module(graph_module, gate)

    def export_onnx(self, model: Any, path: Path, args: tuple, kwargs: dict, opset_version: int) -> Path | None:
        if MERGE_GATE in model.graph_module.meta:
            warnings.warn("TokenMergeConfig.dense_below chooses a graph per call in PyTorch only: the ONNX file "
                          "holds the merged graph and merges at every batch size", stacklevel=3)
        return None
