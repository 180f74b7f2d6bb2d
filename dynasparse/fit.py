"""``dynasparse.fit``: train the gates a config inserted, on a frozen model, by distillation from it.

Only the gates' own parameters train (``RoutedMLP``'s router and adapter); the model's weights are neither
touched nor copied: they are frozen for the run and their ``requires_grad`` flags restored after. The
teacher is the same graph with its gates bypassed, so no second model is held. The loss is the KL of the
gated model's next-token distribution from the teacher's, plus a penalty that holds the share of MLP
token-work kept at ``1 - target_skip`` (straight-through: hard decisions forward, soft backward).
Fitted parameters save as safetensors with a JSON beside it (the config, the routed blocks, shapes), and
``MLPSkipConfig(fitted=PATH)`` loads them into any capture of the same model, ``generate`` included.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dynasparse.api import OptimizedModel
from dynasparse.errors import DynasparseError
from dynasparse.ir.ops import TOKEN_ROUTE
from dynasparse.passes.mlp_skip import RoutedMLP, routed_mlps, save_fitted
from dynasparse.plans import MLP_SKIP_META
from dynasparse.runtime.steps import logits_of


@dataclass
class FitReport:
    """What a fit did: the training loss per step, and on held-out rows the KL from the teacher and the
    share of tokens each routed block skips (decisions as inference takes them)."""

    steps: int
    seconds: float
    loss: list[float] = field(default_factory=list)
    held_out_kl: float = 0.0
    skipped: dict[str, float] = field(default_factory=dict)  # routed module -> share of held-out tokens skipped

    @property
    def skipped_total(self) -> float:
        return sum(self.skipped.values()) / len(self.skipped) if self.skipped else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "skipped_total": self.skipped_total}


def _gates(model: OptimizedModel) -> dict[str, RoutedMLP]:
    if not isinstance(model, OptimizedModel):
        raise DynasparseError(f"fit trains the gates dynasparse.optimize inserted; got {type(model).__name__}. "
                              "Call dynasparse.optimize(model, MLPSkipConfig(...)) first and fit its result")
    gates = routed_mlps(model.graph_module)
    if not gates:
        raise DynasparseError("this model has no trainable gates: optimize it with a config that inserts them "
                              "(MLPSkipConfig)")
    return gates


def _target(model: OptimizedModel) -> float:
    return model.graph_module.meta[MLP_SKIP_META].config.target_skip


def _distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(teacher || student) of next-token distributions."""
    return F.kl_div(student.float().log_softmax(-1), teacher.float().log_softmax(-1), log_target=True,
                    reduction="none").sum(-1).mean()


def _forward(model: OptimizedModel, ids: torch.Tensor) -> torch.Tensor:
    return logits_of(model(input_ids=ids))


def fit(model: OptimizedModel, data: torch.Tensor, *, steps: int = 200, batch_size: int = 4, lr: float = 0.01,
        penalty: float = 100.0, held_out: float = 0.1, seed: int = 0, progress: bool | None = None,
        save: str | Path | None = None) -> FitReport:
    """Train ``model``'s gates on ``data`` [N, T] (token ids of offline text, one row per sample).

    ``held_out`` of the rows (at least one) are kept out of training for the report. ``penalty`` weighs
    the squared gap between the kept share and ``1 - target_skip`` (two-sided: skipping more than asked
    costs quality the target did not ask for). Deterministic under ``seed``.
    ``save``: write the fitted parameters there (safetensors; the JSON goes beside it).
    """
    gates = _gates(model)
    if data.dim() != 2 or data.dtype not in (torch.long, torch.int):
        raise DynasparseError(f"fit takes token ids [rows, tokens] (int64), got {tuple(data.shape)} {data.dtype}")
    n_held = max(1, math.ceil(held_out * data.shape[0]))
    if data.shape[0] - n_held < batch_size or data.shape[1] < 8:
        raise DynasparseError(f"fit needs at least batch_size + held-out rows ({batch_size} + {n_held}) of 8+ "
                              f"tokens; got {data.shape[0]} rows of {data.shape[1]}. Give more or longer rows")
    target = _target(model)
    train, held = data[:-n_held], data[-n_held:]
    fitted = [p for gate in gates.values() for p in gate.fitted_parameters().values()]
    frozen = {p: p.requires_grad for p in model.graph_module.parameters()}
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(fitted, lr=lr)
    report = FitReport(steps, 0.0)
    show = progress if progress is not None else sys.stderr.isatty()
    begin = time.perf_counter()
    try:
        for p in frozen:
            p.requires_grad_(False)
        for p in fitted:
            p.requires_grad_(True)
        bar = tqdm(range(steps), desc="fit", unit="step", file=sys.stderr, disable=not show)
        for _ in bar:
            rows = train[torch.randint(0, train.shape[0], (batch_size,), generator=generator)]
            with torch.no_grad():
                teacher = _run(model, gates, rows, dense=True)
            _set(gates, dense=False, fitting=True)
            student = _forward(model, rows)
            kept = torch.stack([k for gate in gates.values() for k in gate.kept]).mean()
            loss = _distill_loss(student, teacher) + penalty * (kept - (1 - target)) ** 2
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            report.loss.append(loss.item())
            bar.set_postfix_str(f"loss {report.loss[-1]:.4f} kept {kept.item():.2f}", refresh=False)
            for gate in gates.values():
                gate.kept.clear()
    finally:
        _set(gates, dense=False, fitting=False)
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        for p in fitted:
            p.requires_grad_(False)
    report.seconds = time.perf_counter() - begin
    report.held_out_kl, report.skipped = _held_out(model, gates, held)
    if save is not None:
        save_fitted(model.graph_module, save)
    return report


def _set(gates: dict[str, RoutedMLP], dense: bool, fitting: bool) -> None:
    for gate in gates.values():
        gate.dense, gate.fitting = dense, fitting


def _run(model: OptimizedModel, gates: dict[str, RoutedMLP], ids: torch.Tensor, dense: bool) -> torch.Tensor:
    _set(gates, dense=dense, fitting=False)
    try:
        return _forward(model, ids)
    finally:
        _set(gates, dense=False, fitting=False)


@torch.no_grad()
def skipped_per_gate(model: OptimizedModel, ids: torch.Tensor) -> dict[str, float]:
    """Share of the tokens of ``ids`` each gate skips, as inference decides (the routed model's own pass)."""
    return _routed_pass(model, _gates(model), ids)[1]


def _routed_pass(model: OptimizedModel, gates: dict[str, RoutedMLP], ids: torch.Tensor
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """(logits of the routed model, share of tokens each gate skipped), the decisions read by hooks."""
    skipped = {}

    def decisions(name: str):
        def hook(gate: RoutedMLP, args: tuple) -> None:
            keep = TOKEN_ROUTE(args[0], gate.router_weight, gate.router_bias)
            skipped[name] = 1.0 - float(keep.float().mean())
        return hook
    handles = [gate.register_forward_pre_hook(decisions(name)) for name, gate in gates.items()]
    try:
        return _run(model, gates, ids, dense=False), skipped
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def _held_out(model: OptimizedModel, gates: dict[str, RoutedMLP], ids: torch.Tensor
              ) -> tuple[float, dict[str, float]]:
    teacher = _run(model, gates, ids, dense=True)
    student, skipped = _routed_pass(model, gates, ids)
    return float(_distill_loss(student, teacher)), skipped
