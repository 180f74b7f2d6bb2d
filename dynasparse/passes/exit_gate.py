"""Exit gates: after chosen blocks, the model's head reads the hidden state and a confidence decides.

    block i → [head(h_i) → exit_confidence]  → block i+1 → … → head(h_last) → outputs

The head is the model's own: every node between the last block and the outputs, copied with the last
block's output replaced by ``h_i`` (LayerSkip's shared head), optionally behind an affine map fitted on
calibration data (``head="tuned"``, a tuned lens). Gates only compute; the graph still runs full depth.
The staged runtime (``dynasparse.runtime.staged``) splits the graph at the gates and lets confident rows
leave; ``mode="draft"`` instead cuts the graph after its gate (the drafter of self-speculative decoding).
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Iterable

import torch
from torch.fx import Node

from dynasparse.config import BaseConfig, as_tuple, config_type
from dynasparse.errors import DynasparseError
from dynasparse.ir.analysis import GraphAnalysis
from dynasparse.ir.nodes import fake, propagate_fake_values
from dynasparse.ir.ops import EXIT_CONFIDENCE, LEARNED_EXIT
from dynasparse.kernels.exit_gate import CRITERIA, DEFAULT_THRESHOLDS, LEARNED_FEATURES
from dynasparse.passes.exit_learning import load_learned_gates
from dynasparse.plans import EXIT_META, STREAM_STATE, ExitPlan, Gate
from dynasparse.registry import PassResult

def output_nodes(gm: torch.fx.GraphModule) -> list[Node]:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    flat = out.args[0]
    return list(flat) if isinstance(flat, (tuple, list)) else [flat]


@config_type
@dataclasses.dataclass
class ExitGateConfig(BaseConfig):
    """Exit gates after transformer blocks (DeeBERT / PABEE / CALM / LayerSkip family).

    ``after_blocks``: block indices to gate after (default: every block but the last). At a gate, the
    model's own final norm + head read the hidden state (``head="model"``, as LayerSkip does), or the same
    head behind an affine map fitted on calibration data (``head="tuned"``). A row leaves when its
    ``criterion`` confidence is strictly above ``threshold`` (one value, or one per gate):
    ``max_prob``, ``margin`` (top-2 probability gap), ``entropy`` (1 - entropy / log V), ``saturation``
    (cosine of the hidden state with the block's input, CALM), ``patience`` (the prediction has not changed
    for ``patience`` gates, PABEE, and its max probability is above ``threshold``). Every confidence is at
    most 1, so ``threshold=1.0`` never exits. Confidence is read from the model's first output as logits
    over its last dimension; a row with several positions exits when all of them are confident.

    ``learned`` (JEI-DNN): a logistic gate per exit reads the exit's and the previous exit's logits and
    estimates the chance that the exit predicts what the full model would; ``dynasparse.fit`` trains it on
    the frozen model (untrained, it never exits) and ``fitted=PATH`` loads what fit saved.

    ``threshold=None`` takes the criterion's default, or with ``max_quality_drop`` (share of calibration
    rows whose prediction may change) or ``target_speedup`` (estimated from blocks run) is chosen on
    ``optimize(..., calibration=...)`` (for learned gates, by ``dynasparse.fit`` on its held-out rows).

    ``mode``: ``staged`` (rows leave the batch at each gate, the rest continue compacted), ``whole_batch``
    (one graph, ``torch.cond`` exits when every row is confident; exports to ONNX ``If``), ``draft``
    (self-speculative decoding in ``generate``: the model cut after one of ``after_blocks`` drafts, the
    whole model verifies; each round's block and length, up to ``draft_tokens``, are chosen from the
    acceptance and timings measured so far, and plain decoding wherever no drafter pays; no
    ``after_blocks``: a quarter and half of the depth. In ``optimize``, ``draft`` with one block is
    that drafter).
    """

    after_blocks: tuple[int, ...] | None = None
    criterion: str = "max_prob"
    threshold: float | tuple | None = None
    head: str = "model"
    patience: int = 2
    mode: str = "staged"
    max_quality_drop: float | None = None
    target_speedup: float | None = None
    draft_tokens: int = 8
    decode_schedule: tuple[int, int] | None = None
    fitted: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if self.decode_schedule is not None:
            self.decode_schedule = tuple(self.decode_schedule)
            if (len(self.decode_schedule) != 2 or any(not isinstance(b, int) or isinstance(b, bool) or b < 1
                                                      for b in self.decode_schedule)
                    or self.decode_schedule[0] < self.decode_schedule[1]):
                raise DynasparseError(f"{name}.decode_schedule={self.decode_schedule!r}: give (blocks for the first "
                                      "generated token, blocks for the last), ints >= 1, not increasing")
        self.check_int("draft_tokens", 1)
        if self.layers is not None:
            raise DynasparseError(f"{name} gates blocks: give after_blocks=(...) instead of layers")
        if self.after_blocks is not None:
            self.after_blocks = tuple(self.after_blocks)
            if (not self.after_blocks or any(not isinstance(b, int) or isinstance(b, bool) or b < 0
                                             for b in self.after_blocks)):
                raise DynasparseError(f"{name}.after_blocks={self.after_blocks!r} must be block indices >= 0")
            if list(self.after_blocks) != sorted(set(self.after_blocks)):
                raise DynasparseError(f"{name}.after_blocks={self.after_blocks!r} must be increasing, without "
                                      "repeats")
        if self.criterion not in CRITERIA:
            raise DynasparseError(f"{name}.criterion={self.criterion!r} is not a known criterion; expected one "
                                  f"of {list(CRITERIA)}")
        if self.head not in ("model", "tuned"):
            raise DynasparseError(f"{name}.head={self.head!r}; expected 'model' (the model's own head) or "
                                  "'tuned' (an affine map before it, fitted on calibration data)")
        if self.mode not in ("staged", "whole_batch", "draft"):
            raise DynasparseError(f"{name}.mode={self.mode!r}; expected 'staged', 'whole_batch' or 'draft'")
        self.check_int("patience", 1)
        if isinstance(self.threshold, list):
            self.threshold = tuple(self.threshold)
        for value in as_tuple(self.threshold) if self.threshold is not None else ():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise DynasparseError(f"{name}.threshold={self.threshold!r}: confidences lie in [0, 1]; give "
                                      "values in [0, 1] (1.0 never exits)")
        targets = [f for f in ("max_quality_drop", "target_speedup") if getattr(self, f) is not None]
        if len(targets) > 1:
            raise DynasparseError(f"{name}: give max_quality_drop or target_speedup, not both")
        if targets and self.threshold is not None:
            raise DynasparseError(f"{name}: {targets[0]} chooses the threshold on calibration data; "
                                  "drop threshold= or the target")
        if self.max_quality_drop is not None:
            self.check_range("max_quality_drop", 0.0, 1.0, high_open=True)
        if self.target_speedup is not None and not self.target_speedup > 1.0:
            raise DynasparseError(f"{name}.target_speedup={self.target_speedup!r} must be > 1")
        if self.fitted is not None and self.criterion != "learned":
            raise DynasparseError(f"{name}.fitted loads learned gates: give criterion='learned' with it")
        self.check_fitted("gates never exit")
        if self.mode == "whole_batch" and self.criterion == "patience":
            raise DynasparseError(f"{name}(mode='whole_batch'): the patience criterion carries state from gate "
                                  "to gate per row; use mode='staged' or another criterion")

    @property
    def chooses_threshold(self) -> bool:
        return self.max_quality_drop is not None or self.target_speedup is not None

    @property
    def calibrates(self) -> bool:
        """Whether optimize needs calibration data: tuned heads, or a target to choose the threshold for
        (a learned gate's is chosen by ``dynasparse.fit``, once the gates are trained)."""
        return self.head == "tuned" or (self.chooses_threshold and self.criterion != "learned")

    def thresholds(self, num_gates: int) -> list[float]:
        """One threshold per gate (the criterion's default when none was given or calibrated)."""
        if self.threshold is None:
            return [DEFAULT_THRESHOLDS[self.criterion]] * num_gates
        values = list(as_tuple(self.threshold))
        if len(values) == 1:
            return values * num_gates
        if len(values) != num_gates:
            raise DynasparseError(f"{type(self).__name__}.threshold has {len(values)} values for {num_gates} "
                                  "gates; give one value or one per gate")
        return [float(v) for v in values]


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


def stream_after(gm: torch.fx.GraphModule, block: int) -> dict[Node, Node]:
    """What the head reads in place of each stream-state value (``plans.StreamState``) after ``block``."""
    names = {n.name: n for n in gm.graph.nodes}
    return {names[s.final]: names[s.after_block[block]] for s in gm.meta.get(STREAM_STATE, ())
            if block in s.after_block}


def _unavailable_input(gm: torch.fx.GraphModule, head: list[Node], after: Node, last: Node,
                       swaps: dict[Node, Node]) -> Node | None:
    """A value the head reads that is computed after ``after`` (other than the last block's output and the
    stream state read at the block instead)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    inside = set(head)
    for node in head:
        for a in node.all_input_nodes:
            a = swaps.get(a, a)
            if a not in inside and a is not last and a.op != "get_attr" and order[a] > order[after]:
                return a
    return None


def copy_head(gm: torch.fx.GraphModule, head: list[Node], last: Node, hidden: Node,
              swaps: dict[Node, Node] | None = None) -> list[Node]:
    """Insert a copy of the head reading ``hidden`` in place of ``last`` (and ``swaps``' values in place of
    their keys) at the current insert point; return the copies of the graph's flat outputs."""
    env: dict[Node, Node] = {**(swaps or {}), last: hidden}
    for node in head:
        env[node] = gm.graph.node_copy(node, lambda a: env.get(a, a))
    return [env.get(o, o) for o in output_nodes(gm)]


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
        if c.mode == "draft" and (c.after_blocks is None or len(c.after_blocks) != 1):
            raise DynasparseError("ExitGateConfig(mode='draft') in optimize() is the model cut after one block: "
                                  "give after_blocks=(index,). generate(early_exit=ExitGateConfig(mode='draft')) "
                                  "chooses among several blocks (or its own) per round")
        head = head_nodes(gm, analysis)
        last = analysis.blocks[-1].output
        logits = next((o for o in output_nodes(gm) if isinstance(fake(o), torch.Tensor)), None)
        if logits is None:
            raise DynasparseError("the model returns no tensor: an exit gate has no output to read confidence from")
        gates: list[Gate] = []
        previous_logits: Node | None = None  # what a learned gate compares with: the last gate's logits
        for b in chosen:
            block = analysis.blocks[b]
            label = f"gate after block {b} ({block.module})"
            late = _unavailable_input(gm, head, block.output, last, stream_after(gm, b))
            if late is not None:
                result.left_dense[label] = f"the head reads {late.name}, computed after this block"
            elif c.criterion == "saturation" and block.input is None:
                result.left_dense[label] = "no hidden state found entering this block (saturation compares with it)"
            elif c.criterion == "saturation" and fake(block.input).shape != fake(block.output).shape:
                result.left_dense[label] = "the block changes the number of tokens (token merging): saturation " \
                                           "compares states of one shape"
            else:
                gate, previous_logits = self._insert_gate(gm, b, block.output, block.input, head, last, logits,
                                                          previous_logits)
                gates.append(gate)
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
        if c.fitted is not None:
            result.notes.append(load_learned_gates(gm, plan, c.fitted))
        elif c.criterion == "learned":
            result.notes.append("exit_gate: learned gates never exit until dynasparse.fit trains them")
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
                     head: list[Node], last: Node, logits: Node, previous_logits: Node | None) -> tuple[Gate, Node]:
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
            outputs = copy_head(gm, head, last, read, stream_after(gm, b))
            gate_logits = outputs[output_nodes(gm).index(logits)]
            if self.config.criterion == "learned":
                gm.register_buffer(f"exit_{b}_gate_weight", torch.zeros(len(LEARNED_FEATURES)))
                gm.register_buffer(f"exit_{b}_gate_bias", torch.zeros(()))
                compared = gate_logits if previous_logits is None else previous_logits
                weight, bias = graph.get_attr(f"exit_{b}_gate_weight"), graph.get_attr(f"exit_{b}_gate_bias")
                pair = graph.call_function(LEARNED_EXIT, (gate_logits, compared, weight, bias))
            else:
                pair = graph.call_function(EXIT_CONFIDENCE, (gate_logits, hidden, previous if previous is not None
                                                             else hidden, self.config.criterion))
            confidence = graph.call_function(operator.getitem, (pair, 0))
            prediction = graph.call_function(operator.getitem, (pair, 1))
        gate = Gate(b, read.name, confidence.name, prediction.name, [o.name for o in outputs], prediction.name,
                    hidden.name)
        return gate, gate_logits

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
        # everything the outputs do not read goes, shape assertions on dead values included; the export's
        # input guards (a module call that reads only the inputs) stay: without them each call re-checks the
        # inputs' symbolic constraints in Python, which cost more than the drafter's block did
        for node in reversed(list(gm.graph.nodes)):
            guard = node.op == "call_module" and all(i.op == "placeholder" for i in node.all_input_nodes)
            if node not in live and node.op != "placeholder" and not guard:
                gm.graph.erase_node(node)
        gm.delete_all_unused_submodules()
