"""Calibrating exit gates: fit tuned heads, then choose the threshold that meets the config's target.

Quality is measured against the full model itself (no labels needed): the share of calibration rows whose
prediction at their exit differs from the full-depth prediction. That bounds the accuracy drop on data
like the calibration set. Speed is estimated as blocks run (``num_blocks / mean blocks per row``).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch.fx._pytree import tree_flatten_spec
from torch.utils import _pytree as pytree

from dynasparse.errors import DynasparseError
from dynasparse.kernels.exit_gate import exit_decision
from dynasparse.passes.base import calibration_call


class Recorder(torch.fx.Interpreter):
    """Runs the graph and keeps the values of the named nodes (``keep(node, value)`` of them: a recorder
    may keep a summary instead of a large value)."""

    def __init__(self, gm: torch.fx.GraphModule, names: set[str]):
        super().__init__(gm)
        self.names, self.values = names, {}

    def keep(self, node: torch.fx.Node, value):
        return value

    def run_node(self, n):
        value = super().run_node(n)
        if n.name in self.names:
            self.values[n.name] = self.keep(n, value)
        return value


def recorded_runs(gm: torch.fx.GraphModule, batches: Iterable, names: set[str], recorder_type: type = Recorder):
    """Each calibration batch's recorded values and flat outputs, with a clear error for a bad batch."""
    count = 0
    for count, batch in enumerate(batches, start=1):
        args, kwargs = calibration_call(batch)
        recorder = recorder_type(gm, names)
        try:
            flat = tree_flatten_spec((args, kwargs), gm._in_spec)
            with torch.no_grad():
                outputs = recorder.run(*flat)
        except Exception as err:  # noqa: BLE001 - any failure means the batch does not fit the model
            raise DynasparseError(
                f"calibration batch {count} does not fit the model ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:200]}); give batches called like the example inputs "
                "(a dict of keyword tensors, or a tuple of positional ones)") from None
        yield recorder.values, pytree.tree_flatten(outputs)[0]  # the graph's flat outputs
    if count == 0:
        raise DynasparseError("calibration data is empty; pass at least one batch")


def _fit_tuned_heads(gm: torch.fx.GraphModule, plan, batches: list) -> None:
    """Ridge regression of the last block's output on each gate's hidden state, over every token."""
    names = {n.name: n for n in gm.graph.nodes}
    sources = [names[g.hidden].args[0].name for g in plan.gates]
    sums: list[tuple[torch.Tensor, torch.Tensor]] = []
    for values, _ in recorded_runs(gm, batches, set(sources) | {plan.final_hidden}):
        target = values[plan.final_hidden].reshape(-1, values[plan.final_hidden].shape[-1]).double()
        for i, source in enumerate(sources):
            x = values[source].reshape(-1, target.shape[-1]).double()
            x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
            if len(sums) <= i:
                sums.append((torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64),
                             torch.zeros(x.shape[1], target.shape[1], dtype=torch.float64)))
            sums[i][0].add_(x.T @ x)
            sums[i][1].add_(x.T @ target)
    for gate, (xtx, xty) in zip(plan.gates, sums):
        ridge = 1e-3 * xtx.diagonal().mean() * torch.eye(xtx.shape[0], dtype=torch.float64)
        solution = torch.linalg.solve(xtx + ridge, xty)
        weight = getattr(gm, f"exit_{gate.block}_weight")
        weight.copy_(solution[:-1].T.to(weight.dtype))
        getattr(gm, f"exit_{gate.block}_bias").copy_(solution[-1].to(weight.dtype))


def simulate_exits(confidence: torch.Tensor, predictions: list[torch.Tensor], final: torch.Tensor, plan,
                   thresholds: list[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The runtime's exits at one threshold per gate: (each row's prediction, blocks it runs, whether it
    exited early)."""
    rows = final.shape[0]
    answer = final.clone()
    exited = torch.zeros(rows, dtype=torch.bool)
    blocks = torch.full((rows,), float(plan.num_blocks))
    count = torch.zeros(rows, dtype=torch.long)
    previous = None
    for g, gate in enumerate(plan.gates):
        fire, count = exit_decision(confidence[g], predictions[g], previous, count, thresholds[g],
                                    plan.config.criterion, plan.config.patience)
        new = fire & ~exited
        answer = torch.where(new.reshape(rows, *[1] * (final.dim() - 1)), predictions[g], answer)
        blocks = torch.where(new, torch.full_like(blocks, gate.block + 1), blocks)
        exited |= fire
        previous = predictions[g]
    return answer, blocks, exited


def trade_off(confidence: torch.Tensor, predictions: list[torch.Tensor], final: torch.Tensor, plan,
              thresholds: list[float]) -> dict:
    """What the exits at one threshold per gate change (rows whose prediction differs from the full model's)
    and what they save (blocks run)."""
    answer, blocks, exited = simulate_exits(confidence, predictions, final, plan, thresholds)
    agree = (answer == final).reshape(final.shape[0], -1).all(1)
    mean_blocks = float(blocks.mean())
    return {"threshold": thresholds[0], "quality_drop": 1.0 - float(agree.float().mean()),
            "exit_share": float(exited.float().mean()), "mean_blocks": mean_blocks,
            "est_speedup": plan.num_blocks / mean_blocks}


def _choose(curve: list[dict], config) -> dict:
    if config.max_quality_drop is not None:
        ok = [row for row in curve if row["quality_drop"] <= config.max_quality_drop + 1e-12]
        return max(ok, key=lambda row: (row["est_speedup"], row["threshold"]))
    ok = [row for row in curve if row["est_speedup"] >= config.target_speedup]
    if not ok:
        best = max(curve, key=lambda row: row["est_speedup"])
        raise DynasparseError(
            f"ExitGateConfig.target_speedup={config.target_speedup} is out of reach on the calibration data: "
            f"even threshold {best['threshold']:.3g} runs {best['mean_blocks']:.2f} of {curve[0]['mean_blocks']:.0f} "
            f"blocks per row ({best['est_speedup']:.2f}x); lower the target or gate earlier blocks")
    return min(ok, key=lambda row: (row["quality_drop"], -row["threshold"]))


def calibrate(gm: torch.fx.GraphModule, plan, calibration: Iterable) -> list[str]:
    """Fit tuned heads (if asked) and choose thresholds; fills ``plan.thresholds`` / ``plan.curve``.
    Learned gates' thresholds are left to ``dynasparse.fit``, which trains the gates first."""
    batches = list(calibration)
    notes = []
    if plan.config.head == "tuned":
        _fit_tuned_heads(gm, plan, batches)
        notes.append(f"exit_gate: tuned heads fitted on {len(batches)} calibration batches")
    if plan.config.chooses_threshold and plan.config.criterion != "learned":
        notes.extend(choose_thresholds(gm, plan, batches))
    return notes


def gate_outcomes(gm: torch.fx.GraphModule, plan, batches: Iterable
                  ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """(confidence [gates, rows], each gate's predictions, the full model's predictions) over ``batches``."""
    names = {n for g in plan.gates for n in (g.confidence, g.prediction)}
    confidence, predictions, final = [], [[] for _ in plan.gates], []
    for values, outputs in recorded_runs(gm, batches, names):
        confidence.append(torch.stack([values[g.confidence] for g in plan.gates]))
        for g, gate in enumerate(plan.gates):
            predictions[g].append(values[gate.prediction])
        final.append(outputs[plan.logits_index].argmax(-1))
    return torch.cat(confidence, dim=1), [torch.cat(p) for p in predictions], torch.cat(final)


def choose_thresholds(gm: torch.fx.GraphModule, plan, batches: Iterable) -> list[str]:
    """The one threshold (for every gate) that meets the config's target on ``batches``."""
    return pick_threshold(plan, *gate_outcomes(gm, plan, batches))


def pick_threshold(plan, confidence: torch.Tensor, predictions: list[torch.Tensor], final: torch.Tensor
                   ) -> list[str]:
    """Try thresholds at the quantiles of ``confidence`` [gates, rows] and keep the one that meets the
    config's target; fills ``plan.thresholds`` and ``plan.curve``."""
    notes = []
    grid = torch.quantile(confidence.flatten().double(), torch.linspace(0, 1, 101, dtype=torch.float64))
    candidates = sorted({round(float(t), 6) for t in grid} | {1.0})
    plan.curve = [trade_off(confidence, predictions, final, plan, [t] * len(plan.gates)) for t in candidates]
    chosen = _choose(plan.curve, plan.config)
    plan.thresholds = [chosen["threshold"]] * len(plan.gates)
    notes.append(f"exit_gate: threshold {chosen['threshold']:.4g} chosen on {final.shape[0]} calibration rows: "
                 f"{chosen['quality_drop']:.1%} predictions change, {chosen['exit_share']:.0%} exit early, "
                 f"{chosen['mean_blocks']:.2f}/{plan.num_blocks} blocks per row (~{chosen['est_speedup']:.2f}x)")
    step = max(1, len(plan.curve) // 6)
    notes.append("exit_gate: trade-off (threshold: changed / blocks per row / ~speedup) " + "; ".join(
        f"{row['threshold']:.3g}: {row['quality_drop']:.1%} / {row['mean_blocks']:.2f} / {row['est_speedup']:.2f}x"
        for row in plan.curve[::step]))
    return notes
