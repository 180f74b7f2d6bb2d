"""Learned exit gates (JEI-DNN): one logistic gate per exit, trained on the frozen model to predict whether
the exit's prediction equals the full model's.

Training needs no backward pass through the model: the gated graph runs once over the data, and at each
learned gate every position leaves its features (``kernels.exit_gate.learned_features``) and a label (the
gate's prediction is the final one). Each gate is then a logistic regression (L-BFGS, deterministic). The
fitted weights are buffers of the graph, so compile and export carry them; they save with the thresholds.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F

from dynasparse.errors import DynasparseError
from dynasparse.ir.ops import LEARNED_EXIT
from dynasparse.kernels.exit_gate import LEARNED_FEATURES, learned_features, learned_probability
from dynasparse.passes.exit_calibration import Recorder, pick_threshold, recorded_runs, trade_off
from dynasparse.passes.fitted import load_fitted, save_fitted
from dynasparse.plans import EXIT_META, ExitPlan


def learned_plan(gm: torch.fx.GraphModule) -> ExitPlan | None:
    plan = gm.meta.get(EXIT_META)
    return plan if plan is not None and plan.config.criterion == "learned" else None


def gate_tensors(gm: torch.fx.GraphModule, plan: ExitPlan) -> dict[str, dict[str, torch.Tensor]]:
    return {f"exit_{g.block}_gate": {"weight": getattr(gm, f"exit_{g.block}_gate_weight"),
                                     "bias": getattr(gm, f"exit_{g.block}_gate_bias")} for g in plan.gates}


class _FeatureRecorder(Recorder):
    """Keeps, at each learned gate, (features [positions, F], prediction [positions]) instead of its output."""

    def keep(self, node: torch.fx.Node, value):
        if node.target is LEARNED_EXIT:
            logits, previous = self.env[node.args[0]], self.env[node.args[1]]
            return learned_features(logits, previous).reshape(-1, len(LEARNED_FEATURES)), value[1].reshape(-1)
        return value


def _outcomes(gm: torch.fx.GraphModule, plan: ExitPlan, batches: Iterable
              ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Per gate the features and predictions of every position of ``batches``, and the final predictions."""
    names = {n.name: n for n in gm.graph.nodes}
    ops = [names[g.confidence].args[0].name for g in plan.gates]
    features, predictions, final = [[] for _ in ops], [[] for _ in ops], []
    for values, outputs in recorded_runs(gm, batches, set(ops), _FeatureRecorder):
        for g, op in enumerate(ops):
            features[g].append(values[op][0])
            predictions[g].append(values[op][1])
        final.append(outputs[plan.logits_index].argmax(-1).reshape(-1))
    return [torch.cat(f) for f in features], [torch.cat(p) for p in predictions], torch.cat(final)


def _logistic(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) minimizing the mean binary cross-entropy of ``sigmoid(x @ weight + bias)`` against
    ``y``, plus an L2 term that keeps the weights finite when a gate is always (or never) right."""
    with torch.inference_mode(False), torch.enable_grad():  # fit may be called under inference mode
        x, y = x.double().clone(), y.double().clone()
        weight = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
        bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")

        def loss() -> torch.Tensor:
            optimizer.zero_grad()
            value = F.binary_cross_entropy_with_logits(x @ weight + bias, y) + l2 * weight.square().sum()
            value.backward()
            return value
        optimizer.step(loss)
    return weight.detach(), bias.detach()


@torch.no_grad()
def fit_learned_gates(gm: torch.fx.GraphModule, plan: ExitPlan, train: list, held: list) -> dict:
    """Train every learned gate of ``gm`` on ``train`` batches; report on ``held`` (and choose the threshold
    there when the config gives a target). Returns the held-out figures."""
    features, predictions, final = _outcomes(gm, plan, train)
    tensors = gate_tensors(gm, plan)  # in gate order
    for own, x, prediction in zip(tensors.values(), features, predictions):
        weight, bias = _logistic(x, (prediction == final).float())
        own["weight"].copy_(weight)
        own["bias"].copy_(bias)
    features, predictions, final = _outcomes(gm, plan, held)
    confidence = torch.stack([learned_probability(x, own["weight"], own["bias"])
                              for x, own in zip(features, tensors.values())])
    notes = pick_threshold(plan, confidence, predictions, final) if plan.config.chooses_threshold else []
    row = trade_off(confidence, predictions, final, plan, plan.thresholds)
    accuracy = {name: float(((c > 0.5) == (p == final)).float().mean())
                for name, c, p in zip(tensors, confidence, predictions)}
    return {**row, "thresholds": list(plan.thresholds), "gate_accuracy": accuracy, "positions": final.numel(),
            "notes": notes}


def save_learned_gates(gm: torch.fx.GraphModule, path: str | Path) -> Path:
    plan = learned_plan(gm)
    return save_fitted(path, gate_tensors(gm, plan), plan.config, {"thresholds": list(plan.thresholds)})


def load_learned_gates(gm: torch.fx.GraphModule, plan: ExitPlan, path: str | Path) -> str:
    """Load fitted gates; the thresholds fit chose come with them unless the config gives its own."""
    saved = load_fitted(path, gate_tensors(gm, plan))
    if plan.config.threshold is None:
        if len(saved.get("thresholds", ())) != len(plan.gates):
            raise DynasparseError(f"{path} holds no thresholds for {len(plan.gates)} gates; refit it or give "
                                  "ExitGateConfig(threshold=...)")
        plan.thresholds = [float(t) for t in saved["thresholds"]]
    return f"exit_gate: learned gates loaded from {path}, thresholds " + ", ".join(f"{t:.3g}" for t in plan.thresholds)
