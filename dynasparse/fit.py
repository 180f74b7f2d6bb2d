"""``dynasparse.fit``: train the gates a config inserted, on a frozen model, by distillation from it.

Three kinds of gates fit here. MLP routers (``MLPSkipConfig``) are described below. Learned exit gates
(``ExitGateConfig(criterion="learned")``, JEI-DNN) learn from one pass of the model over the data whether
each exit's prediction equals the full model's (``passes.exit_learning``). MLP width thresholds
(``MLPWidthConfig``, TEAL) are set from the magnitudes the data gives each matmul input, for the target
share of multiply-adds, split between input and inner matmuls as keeps the KL smallest (``passes.mlp_width``).

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
from dynasparse.passes.exit_learning import fit_learned_gates, learned_plan, save_learned_gates
from dynasparse.passes.mlp_skip import RoutedMLP, routed_mlps, save_mlp_gates
from dynasparse.passes.mlp_width import fit_widths, save_widths, width_plan
from dynasparse.plans import MLP_SKIP_META
from dynasparse.runtime.steps import logits_of


@dataclass
class FitReport:
    """What a fit did. MLP routers: the training loss per step, and on held-out rows the KL from the teacher
    and the share of tokens each routed block skips (decisions as inference takes them). Learned exits, on
    held-out positions: ``exits`` (the share of predictions the exits change, the share that exit early,
    blocks run, the thresholds, each gate's accuracy at telling whether its prediction is the final one).
    MLP width: ``skipped`` is the share of each block's MLP multiply-adds skipped on held-out rows, and
    ``splits`` the KL on training rows of each inner / input sparsity ratio tried (``steps`` is 0)."""

    steps: int
    seconds: float
    loss: list[float] = field(default_factory=list)
    held_out_kl: float = 0.0
    skipped: dict[str, float] = field(default_factory=dict)  # routed module -> share of held-out tokens skipped
    exits: dict = field(default_factory=dict)
    splits: dict[float, float] = field(default_factory=dict)

    @property
    def skipped_total(self) -> float:
        return sum(self.skipped.values()) / len(self.skipped) if self.skipped else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "skipped_total": self.skipped_total}


def _optimized(model: OptimizedModel) -> OptimizedModel:
    if not isinstance(model, OptimizedModel):
        raise DynasparseError(f"fit trains the gates dynasparse.optimize inserted; got {type(model).__name__}. "
                              "Call dynasparse.optimize(model, MLPSkipConfig(...) or ExitGateConfig(criterion="
                              "'learned') or MLPWidthConfig(...)) first and fit its result")
    return model


def _gates(model: OptimizedModel) -> dict[str, RoutedMLP]:
    return routed_mlps(_optimized(model).graph_module)


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
    """Train ``model``'s gates on ``data``: token ids [N, T] of offline text, one row per sample (learned exit
    gates also take a list of batches called like the example inputs: dicts of keyword tensors or tuples).

    ``held_out`` of the rows or batches (at least one) are kept out of training for the report (and, for
    learned exits with a ``max_quality_drop`` or ``target_speedup``, to choose the threshold on).
    MLP routers: ``steps`` of Adam (``lr``) on ``batch_size`` rows; ``penalty`` weighs the squared gap between
    the kept share and ``1 - target_skip`` (two-sided: skipping more than asked costs quality the target did
    not ask for). Deterministic under ``seed``. ``save``: write the fitted parameters there (safetensors; the
    JSON goes beside it); ``MLPSkipConfig(fitted=...)`` / ``ExitGateConfig(fitted=...)`` load them.
    """
    routers, exits, widths = _gates(model), learned_plan(model.graph_module), width_plan(model.graph_module)
    kinds = [name for name, plan in (("MLP routers", routers), ("learned exits", exits), ("MLP widths", widths))
             if plan]
    if not kinds:
        raise DynasparseError("this model has no trainable gates: optimize it with a config that inserts them "
                              "(MLPSkipConfig, MLPWidthConfig, or ExitGateConfig(criterion='learned'))")
    if len(kinds) > 1 and save is not None:
        raise DynasparseError(f"fit(save=...) writes one kind of gate per file and this model has {' and '.join(kinds)}"
                              ": fit and save them on models optimized with one config each")
    ids = isinstance(data, torch.Tensor)
    if routers or widths or ids:
        _check_ids(data)
    count = data.shape[0] if ids else len(data)
    n_held = max(1, math.ceil(held_out * count))
    if ids and (count - n_held < batch_size or data.shape[1] < 8):
        raise DynasparseError(f"fit needs at least batch_size + held-out rows ({batch_size} + {n_held}) of 8+ "
                              f"tokens; got {count} rows of {data.shape[1]}. Give more or longer rows")
    if not ids and count - n_held < 1:
        raise DynasparseError(f"fit needs more than {n_held} held-out batches to train on; got {count}. Give more "
                              "batches or a smaller held_out")
    train, held = data[:-n_held], data[-n_held:]
    report = FitReport(steps if routers else 0, 0.0)
    begin = time.perf_counter()
    if routers:
        _fit_routers(model, routers, train, held, report, steps=steps, batch_size=batch_size, lr=lr,
                     penalty=penalty, seed=seed, progress=progress)
    if widths:
        report.held_out_kl, report.skipped, report.splits = fit_widths(
            model.graph_module, widths, lambda rows: _forward(model, rows), _distill_loss, train, held, batch_size)
    if exits is not None:
        report.exits = fit_learned_gates(model.graph_module, exits, _batches(train, batch_size),
                                         _batches(held, batch_size))
    report.seconds = time.perf_counter() - begin
    if save is not None:
        (save_mlp_gates if routers else save_widths if widths else save_learned_gates)(model.graph_module, save)
    return report


def _check_ids(data) -> None:
    if not isinstance(data, torch.Tensor) or data.dim() != 2 or data.dtype not in (torch.long, torch.int):
        shape = f"{tuple(data.shape)} {data.dtype}" if isinstance(data, torch.Tensor) else type(data).__name__
        raise DynasparseError(f"fit takes token ids [rows, tokens] (int64) for MLP routers and widths, got {shape}")


def _batches(data, batch_size: int) -> list:
    """Token-id rows in batches of ``batch_size`` (called as ``input_ids=``), or the batches given."""
    if isinstance(data, torch.Tensor):
        return [{"input_ids": data[i:i + batch_size]} for i in range(0, data.shape[0], batch_size)]
    return list(data)


def _fit_routers(model: OptimizedModel, gates: dict[str, RoutedMLP], train: torch.Tensor, held: torch.Tensor,
                 report: FitReport, *, steps: int, batch_size: int, lr: float, penalty: float, seed: int,
                 progress: bool | None) -> None:
    target = _target(model)
    fitted = [p for gate in gates.values() for p in gate.fitted_parameters().values()]
    frozen = {p: p.requires_grad for p in model.graph_module.parameters()}
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(fitted, lr=lr)
    show = progress if progress is not None else sys.stderr.isatty()
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
    report.held_out_kl, report.skipped = _held_out(model, gates, held)


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
    gates = _gates(model)
    if not gates:
        raise DynasparseError("this model has no MLP routers: optimize it with MLPSkipConfig first")
    return _routed_pass(model, gates, ids)[1]


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
