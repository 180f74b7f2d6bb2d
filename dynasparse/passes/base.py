"""The pass contract: find sites → decide → rewrite → verify, and say what happened.

A pass is a small class holding its config. ``apply`` mutates the graph module in place and returns a
``PassResult``: which sites it rewrote, which it left dense and why, and the attention FLOPs it saves.
Each technique's record (``dynasparse.techniques``) names its pass, so ``optimize`` and the compile
backend take configs only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Protocol

import torch

from dynasparse.config import BaseConfig
from dynasparse.ir.analysis import GraphAnalysis
from dynasparse.techniques import Stage, Technique, register


@dataclass
class PassResult:
    """What one pass did; the optimization report is built from these."""

    pass_name: str
    num_matches: int = 0
    applied: list[str] = field(default_factory=list)
    left_dense: dict[str, str] = field(default_factory=dict)
    flops_saved: float = 0.0
    notes: list[str] = field(default_factory=list)


class Pass(Protocol):
    name: ClassVar[str]
    config: BaseConfig

    def apply(self, gm: torch.fx.GraphModule, analysis: GraphAnalysis) -> PassResult: ...


def calibration_call(batch) -> tuple[tuple, dict]:
    """(args, kwargs) of one calibration batch: a tensor, a tuple of positional tensors, or a dict of
    keyword tensors, the way the model is called."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (), dict(batch)


def register_pass(config_cls: type[BaseConfig], stage: Stage = Stage.ATTENTION) -> Callable[[type], type]:
    """Class decorator for a pass with no runtime or export hooks of its own: ``@register_pass(MyConfig)
    class MyPass: ...`` registers a bare technique record for it (see ``dynasparse.techniques``)."""
    def wrap(pass_cls: type) -> type:
        register(type(f"{pass_cls.__name__}Technique", (Technique,), {
            "name": pass_cls.name, "config": config_cls, "pass_class": pass_cls, "stage": stage}))
        return pass_cls
    return wrap
