"""Exit gates to ONNX: a staged model as one file per stage (``exit_confidence`` exports by lowering its
torch reference)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.fx._pytree import tree_flatten_spec

from dynasparse.export.program import auto_dims, onnx_program
from dynasparse.ir.capture import batch_of_two
from dynasparse.plans import EXIT_METADATA
from dynasparse.runtime.staged import WholeBatchExit


def export_stages(model, path: Path, args: tuple, kwargs: dict, opset_version: int) -> Path:
    """A model with exit gates exports as its stages.

    ``mode="staged"``: ``path`` holds stage 0, ``<stem>.stage<k>.onnx`` the others, and the metadata of
    ``path`` the exit logic, so ``ort_session(path)`` runs them with the staged runtime (rows leave at each
    gate). ``mode="whole_batch"``: one file whose gates are ONNX ``If`` nodes, runnable by any ONNX Runtime.
    """
    runner, plan = model.runner, model.runner.plan
    args, kwargs, _ = batch_of_two(tuple(args), dict(kwargs))  # a batch of one would fix the batch dim
    flat = list(tree_flatten_spec((args, kwargs), model.graph_module._in_spec))
    split = runner.split
    if plan.config.mode == "whole_batch":
        program = onnx_program(WholeBatchExit(split, plan), tuple(flat), {}, (auto_dims(flat),), opset_version,
                                input_names=split.input_names[0])
        program.save(str(path))
        return path
    files, live = [], flat
    for k, stage in enumerate(split.modules):
        target = path if k == 0 else path.with_name(f"{path.stem}.stage{k}{path.suffix}")
        program = onnx_program(stage, tuple(live), {}, auto_dims(live), opset_version,
                                input_names=split.input_names[k], output_names=split.output_names[k])
        if k == 0:
            first = program
        else:
            program.save(str(target))
        files.append(target.name)
        with torch.no_grad():
            live = list(stage(*live))[:len(split.row_wise[k])] if k < len(split.row_wise) else []
    first.model.metadata_props[EXIT_METADATA] = json.dumps({
        "stages": files, "row_wise": split.row_wise, "thresholds": plan.thresholds,
        "config": plan.config.to_dict(), "num_blocks": plan.num_blocks,
        "gate_blocks": [g.block for g in plan.gates]})
    first.save(str(path))
    return path
