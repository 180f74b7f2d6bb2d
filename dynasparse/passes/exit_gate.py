"""Exit gates: after chosen blocks, the model's head reads the hidden state and a confidence decides.

    block i → [head(h_i) → exit_confidence]  → block i+1 → … → head(h_last) → outputs

The head is the model's own: every node between the last block and the outputs, copied with the last
block's output replaced by ``h_i`` (LayerSkip's shared head), optionally behind an affine map fitted on
calibration data (``head="tuned"``, a tuned lens). Gates only compute; the graph still runs full depth.
The staged runtime (``dynasparse.runtime.staged``) splits the graph at the gates and lets confident rows
leave; ``mode="draft"`` instead cuts the graph after its gate (the drafter of self-speculative decoding).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch.fx import Node

from dynasparse.config import ExitGateConfig
from dynasparse.errors import DynasparseError
from dynasparse.ir.analysis import GraphAnalysis
from dynasparse.ir.nodes import fake, propagate_fake_values
from dynasparse.ir.ops import EXIT_CONFIDENCE
from dynasparse.passes.base import PassResult, register_pass

EXIT_META = "dynasparse_exit"


@dataclass
class Gate:
    """One gate, by node name (names survive stage splitting and export)."""

    block: int
    hidden: str  # what the head reads (the block's output, or the tuned map of it)
    confidence: str
    prediction: str
    outputs: list[str]  # the head's outputs at this gate, in the graph's flat output order
    last: str  # the gate's last node: the staged runtime cuts the graph after it
    block_output: str = ""  # the block's output: the residual stream carried to the next block


@dataclass
class ExitPlan:
    """What the pass leaves on the graph module for the runtime and the report."""

    config: ExitGateConfig
    gates: list[Gate]
    thresholds: list[float]
    num_blocks: int
    final_hidden: str  # the last block's output
    logits_index: int  # which flat output confidence is read from
    block_outputs: list[str] = field(default_factory=list)  # every block's output, in order
    curve: list[dict] = field(default_factory=list)  # calibration trade-off, one row per threshold tried


def output_nodes(gm: torch.fx.GraphModule) -> list[Node]:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    flat = out.args[0]
    return list(flat) if isinstance(flat, (tuple, list)) else [flat]


def head_nodes(gm: torch.fx.GraphModule, analysis: GraphAnalysis) -> list[Node]:
    """The model's head: nodes after the last block's output that the outputs depend on, in order."""
    last = analysis.blocks[-1].output
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    needed: set[Node] = set()
    stack = [o for o in output_nodes(gm) if isinstance(o, Node)]
    while stack:
        node = stack.pop()
        if node in needed or order[node] <= order[last]:
            continue
        needed.add(node)
        stack.extend(node.all_input_nodes)
    for o in output_nodes(gm):
        if isinstance(o, Node) and o is not last and order[o] < order[last]:
            raise DynasparseError(
                f"the model returns {o.name}, computed before its last block (e.g. output_hidden_states=True "
                "or attentions); an exit cannot produce it. Capture without those outputs.")
    return sorted(needed, key=order.__getitem__)


def _unavailable_input(gm: torch.fx.GraphModule, head: list[Node], after: Node, last: Node) -> Node | None:
    """A value the head reads that is computed after ``after`` (other than the last block's output)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    inside = set(head)
    for node in head:
        for a in node.all_input_nodes:
            if a not in inside and a is not last and a.op != "get_attr" and order[a] > order[after]:
                return a
    return None


def copy_head(gm: torch.fx.GraphModule, head: list[Node], last: Node, hidden: Node) -> list[Node]:
    """Insert a copy of the head reading ``hidden`` in place of ``last`` at the current insert point;
    return the copies of the graph's flat outputs."""
    env: dict[Node, Node] = {last: hidden}
    for node in head:
        env[node] = gm.graph.node_copy(node, lambda a: env.get(a, a))
    return [env.get(o, o) for o in output_nodes(gm)]


@register_pass(ExitGateConfig)
class ExitGatePass:
    name = "exit_gate"

    def __init__(self, config: ExitGateConfig):
        self.config = config
        self.uses_calibration = config.calibrates
        self.calibration: Iterable | None = None

    # -- find sites -------------------------------------------------------------------------------------------
    def _gated_blocks(self, analysis: GraphAnalysis) -> list[int]:
        blocks = analysis.blocks
        if not blocks or blocks[-1].output is None:
            raise DynasparseError("exit gates need the model's block structure (indexed layers such as "
                                  "layers.0, encoder.layer.1); none was found in this graph")
        num = len(blocks)
        chosen = list(self.config.after_blocks) if self.config.after_blocks is not None else list(range(num - 1))
        beyond = [b for b in chosen if b >= num - 1]
        if beyond:
            raise DynasparseError(
                f"ExitGateConfig.after_blocks={self.config.after_blocks}: the model has {num} blocks (0..{num - 1}) "
                f"and a gate after block {beyond[0]} would exit after the model has finished; gate after blocks "
                f"0..{num - 2}")
        if not chosen:
            raise DynasparseError("the model has a single block: there is no earlier block to exit after")
        return chosen

    # -- rewrite ----------------------------------------------------------------------------------------------
    def apply(self, gm: torch.fx.GraphModule, analysis: GraphAnalysis) -> PassResult:
        c = self.config
        result = PassResult(self.name)
        chosen = self._gated_blocks(analysis)
        head = head_nodes(gm, analysis)
        last = analysis.blocks[-1].output
        logits = next((o for o in output_nodes(gm) if isinstance(fake(o), torch.Tensor)), None)
        if logits is None:
            raise DynasparseError("the model returns no tensor: an exit gate has no output to read confidence from")
        gates: list[Gate] = []
        for b in chosen:
            block = analysis.blocks[b]
            label = f"gate after block {b} ({block.module})"
            late = _unavailable_input(gm, head, block.output, last)
            if late is not None:
                result.left_dense[label] = f"the head reads {late.name}, computed after this block"
            elif c.criterion == "saturation" and block.input is None:
                result.left_dense[label] = "no hidden state found entering this block (saturation compares with it)"
            else:
                gates.append(self._insert_gate(gm, b, block.output, block.input, head, last, logits))
                result.applied.append(label)
        if not gates:
            raise DynasparseError("no exit gate could be placed: " + "; ".join(
                f"{k}: {v}" for k, v in result.left_dense.items()))
        result.num_matches = len(gates)
        if c.mode == "draft":
            self._cut_after(gm, gates[0])
            result.notes.append(f"exit_gate: drafter = blocks 0..{gates[0].block} + the model's head")
            return result
        propagate_fake_values(gm)
        plan = ExitPlan(c, gates, c.thresholds(len(gates)), len(analysis.blocks), last.name,
                        output_nodes(gm).index(logits), [b.output.name for b in analysis.blocks])
        if self.uses_calibration:
            from dynasparse.passes.exit_calibration import calibrate

            if self.calibration is None:
                raise DynasparseError("this ExitGateConfig calibrates (head='tuned', max_quality_drop or "
                                      "target_speedup): pass optimize(..., calibration=[batch, ...]) with batches "
                                      "called like the example inputs")
            result.notes.extend(calibrate(gm, plan, self.calibration))
        gm.meta[EXIT_META] = plan
        result.notes.append(f"exit_gate: {c.criterion} > " + ", ".join(f"{t:.3g}" for t in plan.thresholds)
                            + f" after blocks {[g.block for g in gates]} of {plan.num_blocks}, mode {c.mode}")
        return result

    def _insert_gate(self, gm: torch.fx.GraphModule, b: int, hidden: Node, previous: Node | None,
                     head: list[Node], last: Node, logits: Node) -> Gate:
        graph = gm.graph
        with graph.inserting_before(hidden.next):
            read = hidden
            if self.config.head == "tuned":
                width = fake(hidden).shape[-1]
                gm.register_buffer(f"exit_{b}_weight", torch.eye(width, dtype=fake(hidden).dtype))
                gm.register_buffer(f"exit_{b}_bias", torch.zeros(width, dtype=fake(hidden).dtype))
                weight = graph.get_attr(f"exit_{b}_weight")
                bias = graph.get_attr(f"exit_{b}_bias")
                read = graph.call_function(torch.ops.aten.linear.default, (hidden, weight, bias))
                read.meta["nn_module_stack"] = dict(hidden.meta.get("nn_module_stack", {}))
            outputs = copy_head(gm, head, last, read)
            gate_logits = outputs[output_nodes(gm).index(logits)]
            pair = graph.call_function(EXIT_CONFIDENCE, (gate_logits, hidden, previous if previous is not None
                                                         else hidden, self.config.criterion))
            confidence = graph.call_function(operator.getitem, (pair, 0))
            prediction = graph.call_function(operator.getitem, (pair, 1))
        return Gate(b, read.name, confidence.name, prediction.name, [o.name for o in outputs], prediction.name,
                    hidden.name)

    @staticmethod
    def _cut_after(gm: torch.fx.GraphModule, gate: Gate) -> None:
        """The drafter: the outputs become the gate's head outputs; later blocks are dead code."""
        names = {n.name: n for n in gm.graph.nodes}
        out = next(n for n in gm.graph.nodes if n.op == "output")
        flat = [names[o] for o in gate.outputs]
        out.args = (type(out.args[0])(flat) if isinstance(out.args[0], (tuple, list)) else flat[0],)
        live: set[Node] = set()
        stack = [out]
        while stack:
            node = stack.pop()
            if node not in live:
                live.add(node)
                stack.extend(node.all_input_nodes)
        # everything the outputs do not read goes, shape assertions on dead values included
        for node in reversed(list(gm.graph.nodes)):
            if node not in live and node.op != "placeholder":
                gm.graph.erase_node(node)
        gm.delete_all_unused_submodules()
