"""Running exported files in ONNX Runtime with the model's own argument names."""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from dynasparse.errors import DynasparseError


class OrtModel:
    """An ``onnxruntime.InferenceSession`` called with torch tensors (by name or position)."""

    def __init__(self, session: ort.InferenceSession):
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]

    def feeds(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """Arguments by input name (positional first, then keywords); a missing input is an error."""
        feeds = dict(zip(self.input_names, args))
        feeds.update({k: v for k, v in kwargs.items() if k in self.input_names})
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise DynasparseError(f"ONNX model needs inputs {self.input_names}; missing {missing}")
        return feeds

    def __call__(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> list[torch.Tensor]:
        arrays = {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
                  for k, v in self.feeds(args, kwargs).items()}
        return [torch.from_numpy(out) for out in self.session.run(None, arrays)]


def _session(path: str | os.PathLike, providers: list[str] | None, threads: int | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])


def ort_session(path: str | os.PathLike, providers: list[str] | None = None,
                threads: int | None = None) -> OrtModel | OrtStagedModel:
    """Open an exported file; CPU provider unless ``providers`` says otherwise. A model exported with
    staged exit gates opens as an ``OrtStagedModel`` over all its stage files."""
    from dynasparse.export.onnx import EXIT_METADATA

    if not os.path.exists(path):
        raise DynasparseError(f"no ONNX file at {path}; export one with dynasparse.export_onnx first")
    session = _session(path, providers, threads)
    meta = session.get_modelmeta().custom_metadata_map.get(EXIT_METADATA)
    if meta is None:
        return OrtModel(session)
    layout = json.loads(meta)
    folder = os.path.dirname(os.path.abspath(path))
    stages = [OrtModel(session)] + [OrtModel(_session(os.path.join(folder, name), providers, threads))
                                    for name in layout["stages"][1:]]
    return OrtStagedModel(stages, layout)


class OrtStagedModel:
    """The stages of a model with exit gates in ONNX Runtime, run by the same staged loop as in torch:
    rows leave at each gate and the rest continue compacted. Returns the flat outputs, like ``OrtModel``."""

    def __init__(self, stages: list[OrtModel], layout: dict[str, Any]):
        from dynasparse.config import BaseConfig
        from dynasparse.passes.exit_gate import ExitPlan, Gate

        self.stages, self.row_wise = stages, layout["row_wise"]
        gates = [Gate(block, "", "", "", [], "") for block in layout["gate_blocks"]]
        self.plan = ExitPlan(BaseConfig.from_dict(layout["config"]), gates, layout["thresholds"],
                             layout["num_blocks"], "", 0)
        self.last_exit_blocks: torch.Tensor | None = None

    def __call__(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> list[torch.Tensor]:
        from dynasparse.runtime.staged import run_staged

        first = self.stages[0]
        feeds = first.feeds(args, kwargs)
        result = run_staged(self.stages, self.row_wise, self.plan, [feeds[n] for n in first.input_names])
        self.last_exit_blocks = result.exit_blocks
        return result.outputs


def flat_outputs(output: Any) -> list[torch.Tensor]:
    """A model output (tensor, tuple, ModelOutput) flattened in the order ONNX export writes it."""
    from torch.utils import _pytree as pytree

    return [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]


class OrtKVSteps:
    """Steps of an exported KV-cache decoder in ONNX Runtime: the ``KVCache`` lives here, each step feeds it
    in and keeps the updated cache that comes out (the file's metadata describes its layout)."""

    def __init__(self, model: OrtModel, kv, batch: int, seq_len: int):
        from dynasparse.config import BaseConfig
        from dynasparse.export.onnx import KV_METADATA
        from dynasparse.passes.kv_eviction import CacheSite
        from dynasparse.runtime.kv_cache import KVCache

        meta = model.session.get_modelmeta().custom_metadata_map.get(KV_METADATA)
        if meta is None:
            raise DynasparseError("this ONNX file has no KV cache; export a model optimized with "
                                  "KVEvictionConfig (or pass the torch model to generate)")
        layout = json.loads(meta)
        self.config = BaseConfig.from_dict(layout["config"])
        if kv is not None and kv != self.config:
            raise DynasparseError(f"this ONNX file was exported with {self.config}; generate() got kv={kv}. "
                                  "Export again with that config, or leave kv out.")
        sites = [CacheSite(i, f"kv{i}", s["policy"], s["num_kv_heads"], s["head_dim"], s["value_dim"],
                           getattr(torch, s["dtype"])) for i, s in enumerate(layout["sites"])]
        self.model = model
        self.cache = KVCache(sites, self.config, batch, seq_len)
        self.capacities = self.cache.capacities
        self.allocated_bytes = self.cache.allocated_bytes
        self.full_bytes = self.cache.full_bytes

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 last_only: bool = False) -> torch.Tensor:
        from dynasparse.runtime.steps import KEEP

        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        if KEEP in self.model.input_names:
            length = input_ids.shape[1]
            feeds[KEEP] = torch.arange(length - 1 if last_only else 0, length)
        for site, state in zip(self.cache.sites, self.cache.states):
            feeds.update({site.buffer(field): tensor for field, tensor in state.items()})
        outputs = dict(zip(self.model.output_names, self.model(**feeds)))
        for site, state in zip(self.cache.sites, self.cache.states):
            for field in state:
                state[field] = outputs[site.buffer(field) + "_out"]
        logits = outputs["output_0"]
        return logits[:, -1:] if last_only else logits

    def used_bytes(self, real_tokens: list[int]) -> int:
        return self.cache.used_bytes(real_tokens)
