"""The technique registry: one record per technique, and everything shared asks it instead of naming one.

A technique is a config, the pass that applies it, the ops the pass inserts, the **stage** it rewrites,
and its hooks into the torch runtime, ``torch.compile``, ONNX export, ONNX Runtime and generation. Each
record lives in ``dynasparse/techniques/<name>.py`` as a ``Technique`` subclass; ``optimize``, the compile
backend, ``export_onnx``, ``ort_session`` and ``generate`` iterate over the records, so adding a technique
touches no shared file. The pipeline orders passes by stage, as TensorRT-LLM AutoDeploy orders its
transforms, not by the order a user lists configs in.

This module sits below the passes, the runtime and the exporters that the records tie together, so each
of them can ask it; it holds the pass contract (``Pass``, ``PassResult``) the records name for the same
reason. It imports no record: each registers itself when ``dynasparse.techniques`` is imported, which the
package does on import, before anyone can look one up.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol, Sequence

import torch

from dynasparse.config import BaseConfig
from dynasparse.errors import DynasparseError
from dynasparse.ir.analysis import GraphAnalysis


class Stage(enum.IntEnum):
    """Where a pass rewrites; passes run in this order."""

    TOKENS = 10  # the residual stream of encoder blocks: which tokens the blocks carry (token merging)
    MLP_CHANNELS = 14  # inside blocks' MLPs: which input channels each token's matmuls read (MLP width)
    MLP = 15  # inside blocks: which tokens run a block's MLP (MLP skipping), thresholds and all
    ATTENTION = 20  # attention sites: which keys each query reads (sparse attention)
    EXITS = 30  # the head, read after earlier blocks, on the stream the rewrites above left (exit gates)
    CACHE = 40  # a decode cache around every attention site the graph finally has, dense or sparse, in the
    #             blocks a drafter keeps (KV eviction)


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
    """A small class holding its config: find sites → decide → rewrite → verify. ``apply`` mutates the graph
    module in place and says what it rewrote, what it left dense and why, and the attention FLOPs it saves."""

    name: ClassVar[str]
    config: BaseConfig

    def apply(self, gm: torch.fx.GraphModule, analysis: GraphAnalysis) -> PassResult: ...


class Technique:
    """One technique's record. Hooks default to "nothing to do"; a technique overrides the ones it needs.

    Every hook reads the technique's plan from ``graph_module.meta`` (the pass left it there) and returns
    None when the graph has none, so callers simply ask every technique.
    """

    name: ClassVar[str]
    config: ClassVar[type[BaseConfig]]
    pass_class: ClassVar[Callable[[BaseConfig], Pass]]
    stage: ClassVar[Stage]
    ops: ClassVar[tuple[Any, ...]] = ()  # the torch.library ops its pass inserts
    onnx_translations: ClassVar[dict[Any, Callable]] = {}  # hand-written ONNX spellings (onnxscript)
    onnx_lowered: ClassVar[tuple[Any, ...]] = ()  # ops exported by tracing their torch implementation

    def make_pass(self, config: BaseConfig) -> Pass:
        return self.pass_class(config)

    def check_composition(self, config: BaseConfig, others: Sequence[BaseConfig]) -> None:
        """Raise a DynasparseError naming both configs where a combination means nothing."""

    # -- the torch runtime -----------------------------------------------------------------------------------
    def runner(self, graph_module: torch.fx.GraphModule) -> torch.nn.Module | None:
        """What ``OptimizedModel`` calls instead of the graph (a staged runtime, a graph chooser)."""
        return None

    def finish_graph(self, graph_module: torch.fx.GraphModule) -> torch.fx.GraphModule:
        """The graph once every pass has run: where a plan spans graph variants (token density by
        timestep), the one graph that picks among them."""
        return graph_module

    def compile_graph(self, graph_module: torch.fx.GraphModule, example_inputs: list,
                      notes: list[str]) -> torch.fx.GraphModule:
        """The graph the compile backend hands to Inductor (or an error where compiling cannot work)."""
        return graph_module

    # -- export ----------------------------------------------------------------------------------------------
    def export_onnx(self, model: Any, path: Path, args: tuple, kwargs: dict, opset_version: int) -> Path | None:
        """Write the file(s) where this technique changes what an export is (stages, a decode step)."""
        return None

    def ort_model(self, session: Any, path: str, providers: list[str] | None, threads: int | None) -> Any:
        """A runner over an ONNX Runtime session whose metadata this technique wrote, else None."""
        return None

    # -- generation ------------------------------------------------------------------------------------------
    def generation_driver(self, config: BaseConfig) -> Callable | None:
        """A generation loop of its own (self-speculative decoding), else None: the plain loop runs."""
        return None

    def decode_steps(self, decoder: Any, batch: int, seq_len: int, device: torch.device, new_tokens: int,
                     compile: bool | str) -> Any:
        """The step function of a decoder this technique changed (per-token exits), else None."""
        return None

    def ort_steps(self, session: Any, configs: Sequence[BaseConfig], batch: int, seq_len: int,
                  new_tokens: int) -> Any:
        """Decode steps over an exported decoder this technique wrote, else None."""
        return None


_TECHNIQUES: dict[type[BaseConfig], Technique] = {}


def register(technique_class: type[Technique]) -> type[Technique]:
    """Class decorator for a technique record."""
    _TECHNIQUES[technique_class.config] = technique_class()
    return technique_class


def register_pass(config_cls: type[BaseConfig], stage: Stage = Stage.ATTENTION) -> Callable[[type], type]:
    """Class decorator for a pass with no runtime or export hooks of its own: ``@register_pass(MyConfig)
    class MyPass: ...`` registers a bare technique record for it."""
    def wrap(pass_cls: type) -> type:
        register(type(f"{pass_cls.__name__}Technique", (Technique,), {
            "name": pass_cls.name, "config": config_cls, "pass_class": pass_cls, "stage": stage}))
        return pass_cls
    return wrap


def all_techniques() -> list[Technique]:
    """Every technique, in stage order."""
    return sorted(_TECHNIQUES.values(), key=lambda t: t.stage)


def technique_for(config: BaseConfig) -> Technique:
    technique = _TECHNIQUES.get(type(config))
    if technique is None:
        known = ", ".join(t.config.__name__ for t in all_techniques())
        raise DynasparseError(f"{type(config).__name__} is not a technique's config; known: {known}")
    return technique


def in_stage_order(configs: Sequence[BaseConfig]) -> list[BaseConfig]:
    """The configs ordered by their technique's stage (stable: equal stages keep the given order), after
    every technique has checked that the combination means something."""
    for config in configs:
        technique_for(config).check_composition(config, [c for c in configs if c is not config])
    return sorted(configs, key=lambda c: technique_for(c).stage)


def first(hook: str, *args: Any) -> Any:
    """The first non-None answer of ``hook(*args)`` over the techniques in stage order."""
    for technique in all_techniques():
        answer = getattr(technique, hook)(*args)
        if answer is not None:
            return answer
    return None
