"""The staged runtime: a gated graph split at its gates; confident rows leave, the rest continue compacted.

    stage 0 → gate 0 ─ rows that exit write their outputs ─┐
       │ (the others, gathered: no padding work)            │
    stage 1 → gate 1 ─ …                                    ├→ outputs in the original row order
       │                                                    │
    last stage (full depth) ────────────────────────────────┘

Each stage is a plain graph module: it takes the values live at its start (hidden state, masks, position
embeddings: whatever the later blocks read) and returns those live at its end plus the gate's confidence,
prediction and head outputs. Sizes derived from the batch are recomputed inside each stage, so a stage
runs on any number of rows. The same loop drives torch stages and ONNX Runtime sessions of them.
``WholeBatchExit`` is the single-graph variant: ``torch.cond`` exits when every row is confident.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch.fx import Graph, GraphModule, Node
from torch.fx._pytree import tree_flatten_spec
from torch.utils import _pytree as pytree

from dynasparse.errors import DynasparseError
from dynasparse.ir.nodes import fake
from dynasparse.kernels.exit_gate import compact_rows, exit_decision
from dynasparse.config import BaseConfig
from dynasparse.plans import EXIT_META, ExitPlan, Gate

_SCALARS = (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)


@dataclass
class Stages:
    """Stage modules plus, at every cut, which carried values hold one row per batch row."""

    modules: list[GraphModule]
    row_wise: list[list[bool]]  # per cut: for each carried value, True = gather rows, False = shared
    input_names: list[list[str]]
    output_names: list[list[str]]


def _recomputable(node: Node) -> bool:
    """Parameters and sizes: copied into every stage that reads them (sizes then follow the rows left)."""
    return node.op == "get_attr" or (node.op == "call_function" and isinstance(node.meta.get("val"), _SCALARS))


def _symbols(size) -> set:
    return set(size.node.expr.free_symbols) if isinstance(size, torch.SymInt) else set()


def _batch_symbols(gm: GraphModule) -> set:
    for node in gm.graph.nodes:
        value = fake(node) if node.op == "placeholder" else None
        if isinstance(value, torch.Tensor) and value.ndim:
            symbols = _symbols(value.shape[0])
            if not symbols:
                raise DynasparseError("the model was captured with a fixed batch size, so its stages cannot run "
                                      "on the rows left after an exit; capture it with a batch dimension that "
                                      "torch.export keeps dynamic")
            return symbols
    raise DynasparseError("the model has no batched tensor input: exit gates need rows to exit")


def _row_wise(node: Node, batch: set) -> bool:
    value = fake(node)
    if value.ndim and _symbols(value.shape[0]) == batch:
        return True
    if any(batch & _symbols(s) for s in value.shape):
        raise DynasparseError(f"{node.name} (shape {tuple(value.shape)}) carries the batch across an exit gate "
                              "folded into another dimension; the staged runtime can only gather rows of dim 0")
    return False


def split_stages(gm: GraphModule, plan: ExitPlan) -> Stages:
    """Cut the graph after each gate into ``len(gates) + 1`` stage modules."""
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    output = next(n for n in gm.graph.nodes if n.op == "output")
    cuts = {g.last for g in plan.gates}
    stage_of: dict[Node, int] = {}
    stage = 0
    for node in nodes:
        stage_of[node] = -1 if node.op == "placeholder" else stage
        if node.name in cuts:
            stage += 1
    count = stage + 1
    by_name = {n.name: n for n in nodes}
    tails = [[by_name[n] for n in (g.confidence, g.prediction, *g.outputs)] for g in plan.gates]
    tails.append([a for a in output.args[0]] if isinstance(output.args[0], (tuple, list)) else [output.args[0]])

    needs: list[list[Node]] = []
    for s in range(count):
        need: dict[Node, None] = {}

        def visit(a: Node, s: int = s, need: dict = need) -> None:
            if a.op == "get_attr" or stage_of[a] == s:
                return
            if _recomputable(a):
                for b in a.all_input_nodes:
                    visit(b)
            elif stage_of[a] < s:
                need[a] = None

        for node in nodes:
            if stage_of[node] == s:
                for a in node.all_input_nodes:
                    visit(a)
        for a in tails[s]:
            visit(a)
        needs.append(list(need))
    needs[0] = [n for n in nodes if n.op == "placeholder"]
    for s in range(count - 1, 1, -1):  # values read later pass through every stage in between
        extra = [a for a in needs[s] if stage_of[a] < s - 1 and a not in needs[s - 1]]
        needs[s - 1].extend(extra)

    batch = _batch_symbols(gm)
    modules, row_wise, input_names, output_names = [], [], [], []
    for s in range(count):
        graph = Graph()
        env: dict[Node, Node] = {}
        for a in needs[s]:
            env[a] = graph.placeholder(a.name)
            env[a].meta = dict(a.meta)

        def emit(n: Node, graph: Graph = graph, env: dict = env) -> Node:
            if n not in env:
                for b in n.all_input_nodes:
                    emit(b)
                env[n] = graph.node_copy(n, env.__getitem__)
            return env[n]

        for node in nodes:
            if stage_of[node] == s:
                emit(node)
        carried = needs[s + 1] if s + 1 < count else []
        results = [emit(a) for a in carried + tails[s]]
        graph.output(tuple(results))
        modules.append(GraphModule(gm, graph, class_name=f"Stage{s}").eval())
        input_names.append([a.name for a in needs[s]])
        output_names.append([f"carry_{a.name}" for a in carried] + [f"out_{i}" for i in range(len(tails[s]))])
        if s + 1 < count:
            row_wise.append([_row_wise(a, batch) for a in carried])
    return Stages(modules, row_wise, input_names, output_names)


@dataclass
class StagedResult:
    outputs: list[torch.Tensor]
    exit_blocks: torch.Tensor  # [B]: the block after which each row left (the last block: full depth)


def run_staged(stages: Sequence[Callable[..., Sequence[torch.Tensor]]], row_wise: list[list[bool]], plan: ExitPlan,
               inputs: Sequence[torch.Tensor]) -> StagedResult:
    """Run the stages; after each gate, rows that exit write their outputs and the rest are gathered."""
    config = plan.config
    first = next(t for t in inputs if isinstance(t, torch.Tensor) and t.ndim)
    batch, device = first.shape[0], first.device
    rows = torch.arange(batch, device=device)  # the original row of each row still running
    exit_blocks = torch.full((batch,), plan.num_blocks - 1, dtype=torch.long, device=device)
    outputs: list[torch.Tensor | None] = []
    live, previous, count = list(inputs), None, torch.zeros(batch, dtype=torch.long, device=device)

    def write(at: torch.Tensor, values: Sequence[torch.Tensor]) -> None:
        if not outputs:
            outputs.extend(v.new_empty((batch, *v.shape[1:])) for v in values)
        for out, value in zip(outputs, values):
            out.index_copy_(0, at, value)

    for s, stage in enumerate(stages):
        result = list(stage(*live))
        if s == len(stages) - 1:
            write(rows, result)
            break
        carried = len(row_wise[s])
        confidence, prediction = result[carried], result[carried + 1]
        fire, count = exit_decision(confidence, prediction, previous, count, plan.thresholds[s], config.criterion,
                                    config.patience)
        leaving = fire.nonzero()[:, 0]  # the one host sync per gate: how many rows continue
        if leaving.numel():
            write(rows[leaving], [compact_rows(v, leaving) for v in result[carried + 2:]])
            exit_blocks[rows[leaving]] = plan.gates[s].block
            if leaving.numel() == rows.numel():
                break
            staying = (~fire).nonzero()[:, 0]
            live = [compact_rows(v, staying) if by_row else v for v, by_row in zip(result[:carried], row_wise[s])]
            rows, count, previous = rows[staying], count[staying], prediction[staying]
        else:
            live, previous = result[:carried], prediction
    return StagedResult(outputs, exit_blocks)


class WholeBatchExit(torch.nn.Module):
    """One graph: after each gate, ``torch.cond`` returns the head's outputs when every row is confident
    (CALM-style whole-batch exit); exports to ONNX ``If``. Takes and returns flat tensors."""

    def __init__(self, stages: Stages, plan: ExitPlan):
        super().__init__()
        self.stages = torch.nn.ModuleList(stages.modules)
        self.carried = [len(r) for r in stages.row_wise]
        self.thresholds = list(plan.thresholds)
        self.eval()

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._from(0, inputs)

    def _from(self, s: int, live) -> tuple[torch.Tensor, ...]:
        result = tuple(self.stages[s](*live))
        if s == len(self.stages) - 1:
            return result
        carried = self.carried[s]
        confident = (result[carried] > self.thresholds[s]).all()
        operands = result[:carried] + result[carried + 2:]

        def leave(*values):
            return tuple(v.clone() for v in values[carried:])

        def go_on(*values):
            return self._from(s + 1, values[:carried])

        return torch.cond(confident, leave, go_on, operands)


class StagedModel(torch.nn.Module):
    """A gated graph module behind the graph's own call convention (pytree in, pytree out)."""

    def __init__(self, gm: GraphModule):
        super().__init__()
        self.plan: ExitPlan = gm.meta[EXIT_META]
        if self.plan.config.decode_schedule is not None:
            raise DynasparseError("ExitGateConfig.decode_schedule sets the depth of each generated token: use it "
                                  "with dynasparse.generate(..., early_exit=...); optimize a model with a "
                                  "criterion and threshold instead")
        self.split = split_stages(gm, self.plan)
        self.stages = torch.nn.ModuleList(self.split.modules)
        self.whole_batch = WholeBatchExit(self.split, self.plan) if self.plan.config.mode == "whole_batch" else None
        self.in_spec, self.out_spec = gm._in_spec, gm._out_spec
        self.last_exit_blocks: torch.Tensor | None = None

    def forward(self, *args, **kwargs):
        flat = tree_flatten_spec((args, kwargs), self.in_spec)
        if self.whole_batch is not None:
            outputs = list(self.whole_batch(*flat))
        else:
            result = run_staged(list(self.stages), self.split.row_wise, self.plan, flat)
            outputs, self.last_exit_blocks = result.outputs, result.exit_blocks
        return pytree.tree_unflatten(outputs, self.out_spec)


class OrtStagedModel:
    """The stages of a model with exit gates in ONNX Runtime, run by the same staged loop as in torch:
    rows leave at each gate and the rest continue compacted. Returns the flat outputs, like ``OrtModel``."""

    def __init__(self, stages: list, layout: dict[str, Any]):
        self.stages, self.row_wise = stages, layout["row_wise"]
        gates = [Gate(block, "", "", "", [], "") for block in layout["gate_blocks"]]
        self.plan = ExitPlan(BaseConfig.from_dict(layout["config"]), gates, layout["thresholds"],
                             layout["num_blocks"], "", 0)
        self.last_exit_blocks: torch.Tensor | None = None

    def __call__(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> list[torch.Tensor]:
        first = self.stages[0]
        feeds = first.feeds(args, kwargs)
        result = run_staged(self.stages, self.row_wise, self.plan, [feeds[n] for n in first.input_names])
        self.last_exit_blocks = result.exit_blocks
        return result.outputs
