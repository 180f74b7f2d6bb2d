"""Per call, run the token-merged graph or the dense one: a small batch does not earn back the merge cost.

Merging saves work in proportion to the tokens it removes, but each merge also runs a fixed number of
small ops (roles, matching, ranking, scatter). A batch of one short text pays that cost and saves almost
nothing, so ``TokenMergeConfig.dense_below`` sends such calls to the graph as it was before merging.
The choice reads only input shapes: no host sync, and both graphs return the original output shapes.
"""
from __future__ import annotations

import torch
from torch.fx._pytree import tree_flatten_spec

from dynasparse.plans import MERGE_GATE, MergeGate


def dense_module(gm: torch.fx.GraphModule, gate: MergeGate) -> torch.fx.GraphModule:
    """The pre-merge graph over the same parameters, called like ``gm``."""
    dense = torch.fx.GraphModule(gm, gate.dense)
    for spec in ("_in_spec", "_out_spec"):
        if hasattr(gm, spec):
            setattr(dense, spec, getattr(gm, spec))
    return dense


class MergeGatedModel(torch.nn.Module):
    """The merged graph module, falling back to the dense one for batches below ``dense_below``."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__()
        self.gate: MergeGate = gm.meta[MERGE_GATE]
        self.merged = gm
        self.dense = dense_module(gm, self.gate)
        self.last_call_merged: bool | None = None

    def forward(self, *args, **kwargs):
        flat = tree_flatten_spec((args, kwargs), self.merged._in_spec)
        self.last_call_merged = self.gate.worth_merging(flat)
        return (self.merged if self.last_call_merged else self.dense)(*args, **kwargs)
