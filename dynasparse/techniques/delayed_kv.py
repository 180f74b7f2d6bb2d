"""dKV-Cache: a masked-diffusion LM's keys and values kept across denoising steps, run by ``dynasparse.unmask``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from dynasparse.config import BaseConfig
from dynasparse.errors import DynasparseError
from dynasparse.ir.ops import CACHED_ATTENTION, GATHER_ACTIVE
from dynasparse.passes.delayed_kv import DelayedKVConfig, DelayedKVPass
from dynasparse.plans import DELAYED_KV_META
from dynasparse.registry import Stage, Technique, register
from dynasparse.runtime.delayed_kv import DelayedKVModel


@register
class DelayedKV(Technique):
    name = "delayed_kv"
    config = DelayedKVConfig
    pass_class = DelayedKVPass
    stage = Stage.CACHE
    ops = (GATHER_ACTIVE, CACHED_ATTENTION)

    def check_composition(self, config: BaseConfig, others: Sequence[BaseConfig]) -> None:
        if others:
            raise DynasparseError(f"{config} runs a diffusion LM's blocks on each step's active tokens over its "
                                  f"own caches; it does not compose with {type(others[0]).__name__} yet: "
                                  "optimize with DelayedKVConfig alone")

    def compile_graph(self, graph_module: torch.fx.GraphModule, example_inputs: list,
                      notes: list[str]) -> torch.fx.GraphModule:
        if DELAYED_KV_META not in graph_module.meta:
            return graph_module
        config = type(graph_module.meta[DELAYED_KV_META].config).__name__
        raise DynasparseError(f"{config} keeps caches across the calls of a sampling loop, which binds them per "
                              "call (dynasparse.unmask, dynasparse.sample); a torch.compile'd model has no such "
                              f"loop and would recompute every token. Use dynasparse.optimize(model, [{config}(...)])"
                              " with the sampler instead")

    def runner(self, graph_module: torch.fx.GraphModule) -> torch.nn.Module | None:
        return DelayedKVModel(graph_module) if DELAYED_KV_META in graph_module.meta else None

    def export_onnx(self, model: Any, path: Path, args: tuple, kwargs: dict, opset_version: int) -> Path | None:
        if DELAYED_KV_META not in model.graph_module.meta:
            return None
        config = type(model.graph_module.meta[DELAYED_KV_META].config).__name__
        raise DynasparseError("a graph whose blocks run on each step's active tokens keeps its caches across the "
                              "calls of a sampling loop (dynasparse.unmask, dynasparse.sample), which an ONNX file "
                              f"does not hold; export the model without {config}")
