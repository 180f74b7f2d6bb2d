"""``dynasparse.optimize``: capture → canonicalize → passes → a module called like the original."""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from dynasparse.config import BaseConfig
from dynasparse.errors import DynasparseError
from dynasparse.ir.analysis import GraphAnalysis
from dynasparse.ir.capture import capture
from dynasparse.ir.signature import CallLayout
from dynasparse.passes.pipeline import build_passes, run_pipeline
from dynasparse.passes.report import OptimizationReport
from dynasparse.registry import all_techniques


class OptimizedModel(torch.nn.Module):
    """The rewritten graph behind the original call signature, with the optimization ``report``."""

    def __init__(self, graph_module: torch.fx.GraphModule, report: OptimizationReport, layout: CallLayout,
                 example_args: tuple, example_kwargs: dict[str, Any], dynamic_shapes: Any):
        super().__init__()
        self.graph_module = graph_module
        self.report = report
        self.layout = layout
        self.example_args = example_args
        self.example_kwargs = example_kwargs
        self.dynamic_shapes = dynamic_shapes
        runners = [r for r in (t.runner(graph_module) for t in all_techniques()) if r is not None]
        if len(runners) > 1:
            raise DynasparseError(f"{' and '.join(type(r).__name__ for r in runners)} would each run this graph; "
                                  "a technique's configs said they compose but they do not")
        self.runner = runners[0] if runners else None
        self.train(False)

    @property
    def exit_blocks(self) -> torch.Tensor | None:
        """After a call of a model whose rows leave early (exit gates): the block after which each row left
        (the last block: it ran full depth)."""
        return getattr(self.runner, "last_exit_blocks", None)

    def train(self, mode: bool = True) -> OptimizedModel:
        """Inference only: the graph was captured in eval mode and has no training behaviour to switch to."""
        if mode:
            raise DynasparseError("an optimized model runs inference only; train the original model instead")
        self.training = self.graph_module.training = False
        return self

    def forward(self, *args, **kwargs):
        args, kwargs = self.layout.arrange(args, kwargs)
        try:
            return (self.runner or self.graph_module)(*args, **kwargs)
        except AssertionError as err:
            if "Guard failed" not in str(err):
                raise
            raise DynasparseError(
                f"input shape does not match the captured model ({err}); that dimension was fixed when "
                "the model was captured. Optimize again with example inputs of this shape.") from None


def _dense_attention_flops(analysis: GraphAnalysis) -> float:
    return sum(site.flops(*site.example_shape) for site in analysis.sites)


def _no_sites_error(model: torch.nn.Module, report_left_dense: dict[str, str]) -> DynasparseError:
    detail = "".join(f"\n  {site}: {why}" for site, why in report_left_dense.items())
    return DynasparseError(
        f"no attention site found in {type(model).__name__}: dynasparse rewrites attention written as "
        "scaled_dot_product_attention or matmul(q, kᵀ) → softmax → matmul(·, v) on 4-D "
        "[batch, heads, seq, head_dim] tensors. Check that this is a transformer, in eval() mode, and that "
        f"its attention is one of those forms.{detail}")


def optimize(model: torch.nn.Module, configs: BaseConfig | Sequence[BaseConfig] = (), *,
             example_inputs: tuple | torch.Tensor = (), example_kwargs: dict[str, Any] | None = None,
             calibration: Iterable | None = None) -> OptimizedModel:
    """Capture ``model`` with the example inputs, apply ``configs`` as graph passes, return the result.

    With no configs the result computes exactly what the model computes (attention canonicalized only);
    ``report`` says which attention sites were found and what each pass did.
    """
    passes = build_passes(configs)
    if calibration is not None and not any(getattr(p, "uses_calibration", False) for p in passes):
        raise DynasparseError("calibration data was given but none of the configs uses calibration; "
                              "drop calibration= or add a config that calibrates")
    args = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    captured = capture(model, tuple(args), example_kwargs)
    for p in passes:
        if getattr(p, "uses_calibration", False):
            p.calibration = calibration
    result = run_pipeline(captured.graph_module, passes)
    if not result.canonical.sites:
        raise _no_sites_error(model, result.results[0].left_dense)
    report = OptimizationReport(type(model).__name__, result.analysis, result.results, captured.notes,
                                _dense_attention_flops(result.canonical))
    layout = CallLayout(model.forward, captured.example_args, captured.example_kwargs)
    return OptimizedModel(result.graph_module, report, layout, captured.example_args, captured.example_kwargs,
                          captured.dynamic_shapes)
