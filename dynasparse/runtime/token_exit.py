"""Per-token early exit while decoding (CALM), with the skipped layers' KV filled by propagation.

A decode step runs the gated decoder stage by stage. At each gate, a row whose token is confident takes
the gate's prediction and **freezes** its hidden state: every later block reads that frozen state, so
the block's K/V for this token come from it (CALM's propagation) and later tokens still find every
layer's cache filled. Rows do not leave the batch (the cache is per row in place); instead, once every
row has exited, the remaining stages run as **fill stages**: only what the cache writes need (norm,
K/V projections, RoPE, the cache op), not attention output, projections or MLPs. The prompt (prefill)
always runs full depth. With ``decode_schedule`` (SkipDecode) the depth of each step is fixed in advance
and falls over the generation, the same for every row: the whole batch leaves together.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.fx import Graph, GraphModule
from torch.fx._pytree import tree_flatten_spec

from dynasparse.kernels.exit_gate import exit_decision
from dynasparse.plans import EXIT_META, ExitPlan
from dynasparse.runtime.steps import KEEP, TorchSteps
from dynasparse.runtime.staged import Stages, split_stages


def fill_stage(stage: GraphModule, block_outputs: list[str], hidden: str, carried: int) -> GraphModule:
    """``stage`` for rows that all exited: each block's output is replaced by the frozen hidden state
    ``hidden`` (so every block reads it), and what no cache write needs is dropped."""
    graph = Graph()
    mapped = graph.graph_copy(stage.graph, {})
    graph.output(tuple(mapped[:carried]))
    nodes = {n.name: n for n in graph.nodes}
    for name in block_outputs:
        nodes[name].replace_all_uses_with(nodes[hidden])
    graph.eliminate_dead_code()  # the cache ops mutate their buffers: they are kept
    return GraphModule(stage, graph, class_name="FillStage").eval()


@dataclass
class GatedStages:
    """A gated decoder split for per-token exits: built once per graph, shared by every generation."""

    split: Stages
    fills: list[GraphModule | None]  # per stage, the fill-only variant (None for the first)
    hidden_index: list[int]  # per cut, which carried value is the residual stream


_STAGES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def gated_stages(gm: GraphModule) -> GatedStages:
    if gm not in _STAGES:
        plan: ExitPlan = gm.meta[EXIT_META]
        split = split_stages(gm, plan)
        hidden_index = [[n.removeprefix("carry_") for n in names].index(gate.block_output)
                        for names, gate in zip(split.output_names, plan.gates)]
        firsts = [0] + [g.block + 1 for g in plan.gates]
        lasts = [g.block for g in plan.gates] + [plan.num_blocks - 1]
        fills: list[GraphModule | None] = [None]
        for s in range(1, len(split.modules)):
            carried = len(split.row_wise[s]) if s < len(split.row_wise) else 0
            fills.append(fill_stage(split.modules[s], plan.block_outputs[firsts[s]:lasts[s] + 1],
                                    plan.gates[s - 1].block_output, carried))
        _STAGES[gm] = GatedStages(split, fills, hidden_index)
    return _STAGES[gm]


class TokenExitSteps(TorchSteps):
    """Decode steps of a gated KV-cache decoder: per-token exits; prefill runs the whole graph."""

    def __init__(self, decoder: torch.nn.Module, batch: int, seq_len: int, device: torch.device, new_tokens: int):
        self.plan: ExitPlan = decoder.graph_module.meta[EXIT_META]
        self.stages = gated_stages(decoder.graph_module)
        super().__init__(decoder, batch, seq_len, device, prompt_len=seq_len - new_tokens)
        self.blocks_run: list[float] = []  # per decode step: mean blocks per row
        self.decode_steps = max(1, new_tokens - 1)  # the first new token comes from the prompt's pass

    def bind(self) -> None:
        super().bind()
        for module in self.stages.split.modules + self.stages.fills[1:]:
            self.cache.bind(module)

    def _scheduled_blocks(self) -> int | None:
        """SkipDecode: blocks for this decode step, falling linearly over the generation."""
        schedule = self.plan.config.decode_schedule
        if schedule is None:
            return None
        first, last = schedule
        step = min(len(self.blocks_run), self.decode_steps - 1)
        return round(first + (last - first) * step / max(1, self.decode_steps - 1))

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 last_only: bool = False) -> torch.Tensor:
        if input_ids.shape[1] > 1:
            return super().__call__(input_ids, attention_mask, position_ids, last_only)
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        if self.takes_keep:
            kwargs[KEEP] = torch.zeros(1, dtype=torch.long, device=input_ids.device)
        args, kwargs = self.decoder.layout.arrange((), kwargs)
        live = list(tree_flatten_spec((args, kwargs), self.decoder.graph_module._in_spec))
        return self._decode(live, input_ids.shape[0], input_ids.device)

    def _decode(self, live: list, batch: int, device: torch.device) -> torch.Tensor:
        plan: ExitPlan = self.plan
        exited = torch.zeros(batch, dtype=torch.bool, device=device)
        blocks = torch.full((batch,), float(plan.num_blocks), device=device)
        count = torch.zeros(batch, dtype=torch.long, device=device)
        logits = frozen = previous = None
        everyone = False
        scheduled = self._scheduled_blocks()
        for s, stage in enumerate(self.stages.split.modules):
            if everyone:
                live = list(self.stages.fills[s](*live))
                continue
            result = list(stage(*live))
            if s == len(self.stages.split.modules) - 1:
                final = result[plan.logits_index]
                logits = final if logits is None else torch.where(exited[:, None, None], logits, final)
                break
            carried = len(self.stages.split.row_wise[s])
            fire, count = exit_decision(result[carried], result[carried + 1], previous, count, plan.thresholds[s],
                                        plan.config.criterion, plan.config.patience)
            if scheduled is not None:  # the whole batch leaves at the scheduled depth
                fire = torch.full_like(fire, plan.gates[s].block + 1 >= scheduled)
            fire = fire & ~exited
            here = result[carried + 2 + plan.logits_index]
            logits = here if logits is None else torch.where(fire[:, None, None], here, logits)
            live, previous, index = result[:carried], result[carried + 1], self.stages.hidden_index[s]
            frozen = live[index] if frozen is None else torch.where(fire[:, None, None], live[index], frozen)
            exited = exited | fire
            blocks = torch.where(fire, torch.full_like(blocks, plan.gates[s].block + 1), blocks)
            live[index] = torch.where(exited[:, None, None], frozen, live[index])
            everyone = bool(exited.all())  # one host sync per gate
        self.blocks_run.append(float(blocks.mean()))
        return logits
