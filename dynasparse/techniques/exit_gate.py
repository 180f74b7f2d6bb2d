"""Exit gates: the model's own head after earlier blocks, and a confidence that lets rows or tokens leave."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

from dynasparse.config import BaseConfig
from dynasparse.errors import DynasparseError
from dynasparse.export.exit_gate import export_stages
from dynasparse.ir.ops import EXIT_CONFIDENCE, LEARNED_EXIT
from dynasparse.passes.exit_gate import ExitGateConfig, ExitGatePass
from dynasparse.plans import CACHE_META, EXIT_META, EXIT_METADATA
from dynasparse.registry import Stage, Technique, register
from dynasparse.runtime.ort import OrtModel, open_session
from dynasparse.runtime.speculative import self_speculative
from dynasparse.runtime.staged import OrtStagedModel, StagedModel
from dynasparse.runtime.token_exit import TokenExitSteps


def _staged(graph_module: torch.fx.GraphModule) -> bool:
    """Gates a staged runtime runs; with a KV cache, exits are per generated token and generate runs them."""
    return EXIT_META in graph_module.meta and CACHE_META not in graph_module.meta


@register
class ExitGates(Technique):
    name = "exit_gate"
    config = ExitGateConfig
    pass_class = ExitGatePass
    stage = Stage.EXITS
    ops = (EXIT_CONFIDENCE, LEARNED_EXIT)
    onnx_lowered = (EXIT_CONFIDENCE, LEARNED_EXIT)

    def runner(self, graph_module: torch.fx.GraphModule) -> torch.nn.Module | None:
        return StagedModel(graph_module) if _staged(graph_module) else None

    def compile_graph(self, graph_module: torch.fx.GraphModule, example_inputs: list,
                      notes: list[str]) -> torch.fx.GraphModule:
        if EXIT_META in graph_module.meta:
            raise DynasparseError("exit gates need the staged runtime, which runs between compiled graphs: use "
                                  "dynasparse.optimize(model, ExitGateConfig(...)) and torch.compile the result")
        return graph_module

    def export_onnx(self, model: Any, path: Path, args: tuple, kwargs: dict, opset_version: int) -> Path | None:
        return export_stages(model, path, args, kwargs, opset_version) if _staged(model.graph_module) else None

    def ort_model(self, session: OrtModel, path: str, providers: list[str] | None, threads: int | None) -> Any:
        meta = session.session.get_modelmeta().custom_metadata_map.get(EXIT_METADATA)
        if meta is None:
            return None
        layout = json.loads(meta)
        folder = os.path.dirname(os.path.abspath(path))
        stages = [session] + [OrtModel(open_session(os.path.join(folder, name), providers, threads))
                              for name in layout["stages"][1:]]
        return OrtStagedModel(stages, layout)

    def generation_driver(self, config: BaseConfig) -> Callable | None:
        if not isinstance(config, ExitGateConfig):
            return None
        if config.mode == "whole_batch":
            raise DynasparseError(f"generate(early_exit=...) takes mode='staged' (per-token exits) or 'draft' "
                                  f"(self-speculative decoding), not {config.mode!r}")
        return self_speculative if config.mode == "draft" else None

    def decode_steps(self, decoder: Any, batch: int, seq_len: int, device: torch.device, new_tokens: int,
                     compile: bool | str) -> Any:
        if EXIT_META not in decoder.graph_module.meta:
            return None
        if compile:
            raise DynasparseError("per-token exits run stage by stage with a host decision per gate, which "
                                  "compile=True cannot capture; leave compile off with early_exit")
        return TokenExitSteps(decoder, batch, seq_len, device, new_tokens)
