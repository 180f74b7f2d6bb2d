"""The export of a KV-cache decoder as a step function: (inputs, cache) -> (outputs, updated cache).

The cache step itself has no ONNX spelling of its own: ``kv_cache_attention_functional`` is exported by
tracing its torch implementation (``kernels.kv_cache.kv_cache_step_functional``, out of place and free of
step-length branches), so prefill chunks and decode steps share one graph. The exported decoder
(``runtime.step_graph``) takes the cache as explicit inputs (``kv<i>_<field>``) and returns the
updated cache after the logits, so ONNX Runtime owns the state between steps.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

from torch.export import Dim

from dynasparse.errors import DynasparseError
from dynasparse.export.program import onnx_program
from dynasparse.ir.nodes import bound_args
from dynasparse.ir.ops import KV_CACHE_SPARSE_ATTENTION
from dynasparse.kernels.kv_cache import STATE_FIELDS, empty_state
from dynasparse.plans import CACHE_META, KV_METADATA
from dynasparse.runtime.step_graph import step_graph


def export_decoder_step(model, path: Path, args: tuple, kwargs: dict, opset_version: int) -> Path:
    """A KV-cache decoder exports as one step: (inputs, cache) → (outputs, updated cache).

    Batch, new tokens and cache slots stay dynamic; the config and the cache layout go into the file's
    metadata, so ``dynasparse.generate`` can drive the ONNX Runtime session with its own cache.
    """
    plan = model.graph_module.meta[CACHE_META]
    if any(site.tier_bits for site in plan.sites):
        raise DynasparseError(f"{plan.config}: the compressed tier (tier_bits) has no ONNX spelling yet (a step "
                              "decides on the host when a block leaves the full-precision slots); export the "
                              "decoder without tier_bits, or run it in torch")
    sparse = [node for node in model.graph_module.graph.nodes if node.target is KV_CACHE_SPARSE_ATTENTION]
    for node in sparse:
        if bound_args(node)["decode_keep"] < 1.0:
            raise DynasparseError(f"query-aware decode (decode_keep={bound_args(node)['decode_keep']}) has no "
                                  "ONNX spelling yet; export the decoder with SparseAttentionConfig.decode_keep=1.0")
    if sparse:
        warnings.warn(f"{len(sparse)} cache sites plan sparse prefill chunks, which have no ONNX spelling yet: the "
                      "exported step reads every block (dense prefill, same cache and eviction); torch runs them "
                      "sparse", stacklevel=2)
    step, input_names, output_names = step_graph(model.graph_module, plan, functional=True)
    inputs = list(args) + [kwargs[name] for name in model.layout.captured[len(args):]]
    batch = inputs[0].shape[0]
    states = [empty_state(batch, s.num_kv_heads, 8, s.head_dim, s.value_dim, s.dtype) for s in plan.sites]
    cache = [state[field] for state in states for field in STATE_FIELDS]
    auto = Dim.AUTO
    dynamic = [{0: auto, 1: auto} if t.dim() >= 2 else {0: auto} for t in inputs]
    for state in states:
        dynamic += [{0: auto, 2: auto}, {0: auto, 2: auto}, {0: auto, 2: auto}, {0: auto, 2: auto}, {0: auto}]
    # no onnxscript optimizer pass: its rewriter takes minutes on a 30-layer decoder step (a graph per
    # layer for the cache), and ONNX Runtime optimizes the graph itself when it loads it
    program = onnx_program(step, tuple(inputs + cache), {}, tuple(dynamic), opset_version, optimize=False,
                            input_names=input_names, output_names=output_names)
    program.model.metadata_props[KV_METADATA] = json.dumps({
        "config": plan.config.to_dict(),
        "sites": [{"policy": s.policy, "num_kv_heads": s.num_kv_heads, "head_dim": s.head_dim,
                   "value_dim": s.value_dim, "dtype": str(s.dtype).removeprefix("torch."), "role": s.role,
                   "heads": list(s.heads)} for s in plan.sites]})
    program.save(str(path))
    return path
