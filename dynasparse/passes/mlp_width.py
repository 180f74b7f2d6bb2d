"""MLP width: per token, each matmul of a block's MLP reads only the input channels that matter (TEAL, CATS).

    x → [|x| < t₀ ? 0 : x] → gate, up → h → [|h| < t₁ ? 0 : h] → down

A ``ChannelThreshold`` in front of every matmul input of the MLP zeroes the entries below a fitted
magnitude: a token whose channel is zero skips that channel's weight column, so the share of multiply-adds
skipped is the share of entries zeroed, weighted by the matmul widths. Where whole-token skipping
(``mlp_skip``) has to drop all of a token's MLP or none, width drops the small parts of every token's, which
on models not trained to skip costs far less quality per multiply-add saved. Thresholds start at zero
(every channel kept: the model itself); ``dynasparse.fit`` sets them on offline text for a target share.
With fitted thresholds each matmul and the threshold it reads become one ``row_sparse_linear``, which a
decode step runs reading only the weight rows of the channels kept, from an input-major copy of
``nn.Linear`` weights (``row_sparse=False``: the thresholds before the model's dense matmuls, no copy).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Callable

import torch
from torch.fx import Node

from dynasparse.config import BaseConfig, config_type
from dynasparse.errors import DynasparseError
from dynasparse.ir.analysis import GraphAnalysis, block_mlps
from dynasparse.ir.nodes import aten, copy_meta, fake
from dynasparse.ir.ops import CHANNEL_SPARSIFY, ROW_SPARSE_LINEAR
from dynasparse.kernels.mlp_width import threshold_for
from dynasparse.passes.fitted import load_fitted, save_fitted
from dynasparse.plans import MLP_WIDTH_META, MLPWidthPlan, WidthSite
from dynasparse.registry import PassResult

# matmuls of an MLP, and the argument each reads its activations from (the others are weights and biases)
_MATMULS = {aten.linear.default: 0, aten.mm.default: 0, aten.matmul.default: 0, aten.addmm.default: 1}
RATIOS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5)  # inner / input sparsity splits fit tries (TEAL: inner is sparser)
MAX_SHARE = 0.95  # no site zeroes more than this share of its entries
SAMPLES = 1 << 18  # magnitudes kept per site for the thresholds


@config_type
@dataclasses.dataclass
class MLPWidthConfig(BaseConfig):
    """Per-token MLP width behind fitted magnitude thresholds (TEAL / CATS).

    ``target_skip``: the share of the MLPs' multiply-adds ``dynasparse.fit`` sets the thresholds to skip,
    over every thresholded block. ``fitted``: a file ``dynasparse.fit`` saved (safetensors, a JSON beside
    it); without it every channel is kept. ``row_sparse``: with fitted thresholds, run the MLP's matmuls as
    row-sparse ones (decode steps read only the weight rows of nonzero channels; ``nn.Linear`` weights get an
    input-major copy). ``layers``: the blocks to threshold (default: all).
    """

    target_skip: float = 0.25
    fitted: str | None = None
    row_sparse: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_range("target_skip", 0.0, 1.0, low_open=True, high_open=True)
        self.check_fitted("every channel is kept")


class ChannelThreshold(torch.nn.Module):
    """Zeroes the entries of a matmul's input below ``threshold`` (a buffer: fitted, saved, not trained)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("threshold", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return CHANNEL_SPARSIFY(x, self.threshold)


def width_plan(gm: torch.fx.GraphModule) -> MLPWidthPlan | None:
    return gm.meta.get(MLP_WIDTH_META)


def _calls_thresholds(gm: torch.fx.GraphModule, plan: MLPWidthPlan) -> None:
    """Fitting and counting read the ``ChannelThreshold`` calls, which fitted row-sparse graphs fold away."""
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    if not {site.module for site in plan.sites} <= called:
        raise DynasparseError("this graph runs fitted thresholds inside its matmuls (row_sparse); fit and count "
                              "on one optimized with MLPWidthConfig(target_skip=...) or row_sparse=False")


def _thresholds(gm: torch.fx.GraphModule, plan: MLPWidthPlan) -> dict[str, dict[str, torch.Tensor]]:
    return {site.module: {"threshold": gm.get_submodule(site.module).threshold} for site in plan.sites}


def save_widths(gm: torch.fx.GraphModule, path: str | Path) -> Path:
    """Write the fitted thresholds (safetensors, the layout in a JSON beside it)."""
    plan = width_plan(gm)
    return save_fitted(path, _thresholds(gm, plan), plan.config)


class MLPWidthPass:
    name = "mlp_width"

    def __init__(self, config: MLPWidthConfig):
        self.config = config

    # -- find sites: the matmuls inside each block's MLP (ir.analysis.block_mlps) --------------------------------
    @staticmethod
    def _inputs(members: list[Node]) -> dict[Node, list[Node]] | str:
        """Each activation a matmul of the MLP reads -> the matmuls reading it, or why there are none."""
        readers: dict[Node, list[Node]] = {}
        for node in members:
            if node.op == "call_function" and node.target in _MATMULS:
                readers.setdefault(node.args[_MATMULS[node.target]], []).append(node)
        if not readers:
            return "no matmul (linear / mm / addmm) inside the MLP"
        return readers

    @staticmethod
    def _macs(matmuls: list[Node]) -> int:
        """Multiply-adds per token of ``matmuls``: their weights' sizes."""
        weights = [m.args[1] if m.target is not aten.addmm.default else m.args[2] for m in matmuls]
        return sum(math.prod(fake(w).shape) for w in weights)

    # -- rewrite ------------------------------------------------------------------------------------------------
    def apply(self, gm: torch.fx.GraphModule, analysis: GraphAnalysis) -> PassResult:
        result = PassResult(self.name)
        sites, result.left_dense = block_mlps(gm, analysis, self.config.applies_to, "MLP width")
        plan = MLPWidthPlan(self.config, {})
        for block, (label, site) in sites.items():
            readers = self._inputs(site.members)
            if isinstance(readers, str):
                result.left_dense[label] = readers
                continue
            plan.blocks[block] = self._threshold(gm, block, readers)
            result.applied.append(label)
        if not plan.blocks:
            raise DynasparseError("no MLP could be thresholded: " + "; ".join(f"{k}: {v}" for k, v in
                                                                            result.left_dense.items()))
        result.num_matches = len(plan.blocks)
        gm.meta[MLP_WIDTH_META] = plan
        if self.config.fitted is None:
            result.notes.append("mlp_width: thresholds keep every channel until dynasparse.fit sets them")
        else:
            load_fitted(self.config.fitted, _thresholds(gm, plan))
            if self.config.row_sparse:
                modules = {site.module for site in plan.sites}
                copied = sum(self._row_sparse(gm, matmul) for matmul in list(gm.graph.nodes)
                             if matmul.op == "call_function" and matmul.target in _MATMULS
                             and any(a.op == "call_module" and a.target in modules for a in matmul.all_input_nodes))
                result.notes.append(f"mlp_width: row-sparse matmuls read input-major weights ({copied / 2**20:.1f} MiB "
                                    "copied from nn.Linear; row_sparse=False keeps the dense matmuls, no copy)")
        gm.graph.lint()
        gm.recompile()
        return result

    def _threshold(self, gm: torch.fx.GraphModule, block: int, readers: dict[Node, list[Node]]) -> list[WidthSite]:
        """Put a ``ChannelThreshold`` between each activation and the matmuls that read it."""
        matmuls = {m for ms in readers.values() for m in ms}
        sites = []
        for k, (activation, users) in enumerate(readers.items()):
            name = f"mlp_width_{block}_{k}"
            gm.add_submodule(name, ChannelThreshold().to(fake(activation).device if fake(activation).device.type
                                                         != "meta" else "cpu"))
            with gm.graph.inserting_before(users[0]):
                call = gm.graph.call_module(name, (activation,))
            copy_meta(users[0], call)
            call.meta["val"] = fake(activation)
            call.meta.pop("tensor_meta", None)
            for user in users:
                user.replace_input_with(activation, call)
            sites.append(WidthSite(name, self._macs(users), int(_after_a_matmul(activation, matmuls))))
        return sites

    @staticmethod
    def _row_sparse(gm: torch.fx.GraphModule, matmul: Node) -> int:
        """Replace ``matmul`` and the threshold it reads by one ``row_sparse_linear`` over an input-major
        weight; the bytes copied to make one (0 for Conv1D's addmm and for mm, whose weights already are)."""
        thresholded = matmul.args[_MATMULS[matmul.target]]
        if matmul.target is aten.addmm.default:
            weight, bias = matmul.args[2], matmul.args[0]
        else:
            weight, bias = matmul.args[1], matmul.args[2] if len(matmul.args) > 2 else None
        if weight.op != "get_attr" or fake(weight).dim() != 2 or (bias is not None and bias.op != "get_attr"):
            return 0
        copied = 0
        with gm.graph.inserting_before(matmul):
            if matmul.target is aten.linear.default:  # [out, in]: transposed once
                tensor = functools.reduce(getattr, weight.target.split("."), gm)
                name = weight.target.replace(".", "_") + "_input_major"
                gm.register_buffer(name, tensor.detach().t().contiguous())
                input_major = gm.graph.get_attr(name)
                input_major.meta["val"] = fake(weight).t().contiguous()
                copied = tensor.numel() * tensor.element_size()
            else:
                input_major = weight
            threshold = gm.graph.get_attr(f"{thresholded.target}.threshold")
            call = gm.graph.call_function(ROW_SPARSE_LINEAR, (thresholded.args[0], input_major, bias, threshold))
        copy_meta(matmul, call)
        matmul.replace_all_uses_with(call)
        gm.graph.erase_node(matmul)
        for node in (thresholded, weight):  # the threshold call once its last matmul is folded, a replaced weight
            if not node.users:
                gm.graph.erase_node(node)
        return copied


def _after_a_matmul(node: Node, matmuls: set[Node]) -> bool:
    """Whether ``node`` is computed from one of ``matmuls`` (an inner activation of the MLP)."""
    seen, todo = set(), [node]
    while todo:
        current = todo.pop()
        if current in matmuls:
            return True
        if current in seen or current.op != "call_function":
            continue
        seen.add(current)
        todo += current.all_input_nodes
    return False


# -- fit: thresholds for a target share of multiply-adds ----------------------------------------------------------

def fit_widths(gm: torch.fx.GraphModule, plan: MLPWidthPlan, run: Callable[[torch.Tensor], torch.Tensor],
               distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], train: torch.Tensor,
               held: torch.Tensor, batch_size: int) -> tuple[float, dict[str, float], dict[float, float]]:
    """Set every site's threshold so the MLPs skip ``target_skip`` of their multiply-adds, splitting the
    share between input and inner sites as the ratio in ``RATIOS`` that keeps ``run``'s output closest (by
    ``distance`` to the thresholds-off output) on the training rows. Returns (the held-out distance, the
    share each block skips there, the distance per ratio tried)."""
    _calls_thresholds(gm, plan)
    sites = plan.sites
    modules = {site.module: gm.get_submodule(site.module) for site in sites}
    _set(modules, {})
    magnitudes = _magnitudes(modules, run, train, batch_size)
    calibration = train[:batch_size]
    with torch.no_grad():
        teacher = run(calibration)
        tried = {}
        for ratio in RATIOS:
            _set(modules, _split(sites, magnitudes, plan.config.target_skip, ratio))
            tried[ratio] = float(distance(run(calibration), teacher))
    best = min(tried, key=tried.get)
    thresholds = _split(sites, magnitudes, plan.config.target_skip, best)
    _set(modules, {})
    with torch.no_grad():
        teacher = run(held)
    _set(modules, thresholds)
    with torch.no_grad():
        held_out, skipped = skipped_per_block(gm, plan, run, held)
    return float(distance(held_out, teacher)), skipped, tried


def _set(modules: dict[str, ChannelThreshold], thresholds: dict[str, torch.Tensor]) -> None:
    for name, module in modules.items():
        module.threshold.copy_(thresholds.get(name, torch.zeros(())))


def _magnitudes(modules: dict[str, ChannelThreshold], run: Callable, train: torch.Tensor,
                batch_size: int) -> dict[str, torch.Tensor]:
    """Sorted samples of each site's input magnitudes over the training rows."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    per_call = SAMPLES // math.ceil(train.shape[0] / batch_size)

    def record(name: str):
        def hook(module: ChannelThreshold, args: tuple) -> None:
            flat = args[0].detach().abs().flatten().float()
            seen[name].append(flat[::max(1, flat.numel() // per_call)])
        return hook
    handles = [module.register_forward_pre_hook(record(name)) for name, module in modules.items()]
    try:
        with torch.no_grad():
            for start in range(0, train.shape[0], batch_size):
                run(train[start:start + batch_size])
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(values).sort().values for name, values in seen.items()}


def _split(sites: list[WidthSite], magnitudes: dict[str, torch.Tensor], target: float,
           ratio: float) -> dict[str, torch.Tensor]:
    """Thresholds that zero ``a * ratio**depth`` of each site's entries, ``a`` chosen by bisection so the
    multiply-adds skipped over all sites are ``target`` of the total."""
    def shares(a: float) -> list[float]:
        return [min(MAX_SHARE, a * ratio ** site.depth) for site in sites]

    total = sum(site.macs for site in sites)
    low, high = 0.0, 1.0
    for _ in range(40):
        middle = (low + high) / 2
        skipped = sum(site.macs * s for site, s in zip(sites, shares(middle))) / total
        low, high = (middle, high) if skipped < target else (low, middle)
    return {site.module: threshold_for(magnitudes[site.module], share) for site, share in zip(sites, shares(high))}


def skipped_per_block(gm: torch.fx.GraphModule, plan: MLPWidthPlan, run: Callable[[torch.Tensor], torch.Tensor],
                      ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """(``run(ids)``, the share of each block's MLP multiply-adds its thresholds skipped, as run): a zeroed
    entry of a site skips that site's multiply-adds per channel."""
    _calls_thresholds(gm, plan)
    zeroed: dict[str, float] = {}

    def count(name: str):
        def hook(module: ChannelThreshold, args: tuple) -> None:
            zeroed[name] = float((args[0].abs() < module.threshold.to(args[0].dtype)).float().mean())
        return hook
    handles = [gm.get_submodule(site.module).register_forward_pre_hook(count(site.module)) for site in plan.sites]
    try:
        out = run(ids)
    finally:
        for handle in handles:
            handle.remove()
    skipped = {}
    for block, sites in plan.blocks.items():
        skipped[f"block {block}"] = sum(s.macs * zeroed[s.module] for s in sites) / sum(s.macs for s in sites)
    return out, skipped
