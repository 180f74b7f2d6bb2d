"""ONNX export of token merging: standard ops only, and ONNX Runtime matches the optimized PyTorch model.

Two levels:
  * models: bert-tiny (random weights) with every merge mode, and the real MiniLM, exported after
    ``optimize`` and run in ONNX Runtime at batch 1 and 3 (last row padded) and at lengths other than the
    example's;
  * ops: each token-merge op alone on inputs full of *exact* ties, so the tie-breaking of the translations
    (TopK's index order for torch's stable argsort, ArgMax's first index for torch's max) is what is tested.
    The tied metrics are built from binary fractions whose normalised dot products are exact in float32, so
    both runtimes compute bit-identical similarities; with ordinary floats, two mathematically equal
    similarities can round differently in PyTorch and ONNX Runtime and flip a decision, which no
    translation can prevent (real models practically never produce such ties).
"""
from __future__ import annotations

import itertools

import onnx
import onnxruntime as ort
import pytest
import torch
from torch.export import Dim

import dynasparse
from dynasparse.export.program import onnx_program
from dynasparse.runtime.ort import flat_outputs

from conftest import load

pytestmark = pytest.mark.slow  # exports and compiles: deselect locally with -m 'not slow'

ops = torch.ops.dynasparse

MODEL_CONFIGS = {
    "r2": dict(r=2),
    "keep_ratio": dict(keep_ratio=0.6, min_tokens=6, metric="hidden"),
    "prune": dict(keep_ratio=0.6, mode="prune"),
    "threshold": dict(r=3, mode="threshold", threshold=0.3),
}


def _domains_and_ops(path) -> tuple[set[str], set[str]]:
    model = onnx.load(str(path))
    return {node.domain for node in model.graph.node}, {node.op_type for node in model.graph.node}


def _check_model(name: str, config: dict, example_len: int, lengths: tuple[int, int], tmp_path):
    entry = load(name)
    optimized = dynasparse.optimize(entry.model, [dynasparse.TokenMergeConfig.tome(**config)],
                                    example_kwargs=entry.make_inputs(2, example_len))
    path = dynasparse.export_onnx(optimized, tmp_path / "m.onnx")
    domains, op_types = _domains_and_ops(path)
    assert domains <= {"", "ai.onnx"}, f"non-standard ONNX domains {domains}"
    assert {"TopK", "ScatterElements", "GatherElements"} <= op_types, "the merge ops were not translated"
    session = dynasparse.ort_session(path)
    for batch, length in itertools.product((1, 3), lengths):
        inputs = entry.make_inputs(batch, length)  # the last row is padded
        with torch.no_grad():
            expected = flat_outputs(optimized(**inputs))
        actual = session(**inputs)
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            torch.testing.assert_close(a, e, atol=1e-4, rtol=0, msg=lambda m: f"batch {batch}, length {length}: {m}")


@pytest.mark.parametrize("config", list(MODEL_CONFIGS))
def test_bert_tiny_onnx_matches_optimized(config, tmp_path):
    short = 4 if config == "r2" else 9  # 4 tokens: a constant r is capped per row, in the exported max too
    _check_model("bert-tiny", MODEL_CONFIGS[config], 12, (short, 16), tmp_path)


def test_minilm_onnx_matches_optimized(tmp_path):
    """The real model, in the main mode only: its 6 merged blocks make one export take ~15 s, and bert-tiny
    and the op tests below cover every mode."""
    _check_model("minilm", MODEL_CONFIGS["keep_ratio"], 24, (20, 33), tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Single ops, exact ties
# ---------------------------------------------------------------------------------------------------------

def _export(module, example, dynamic_shapes, path):
    program = onnx_program(module, example, {}, dynamic_shapes, 18)
    program.save(str(path))
    domains, _ = _domains_and_ops(path)
    assert domains <= {"", "ai.onnx"}, f"non-standard ONNX domains {domains}"
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(session, names, args):
    wanted = {i.name for i in session.get_inputs()}
    feeds = {n: a.numpy() for n, a in zip(names, args) if n in wanted}
    return [torch.from_numpy(out) for out in session.run(None, feeds)]


class _Merge(torch.nn.Module):
    def __init__(self, mode, r, ratio_milli, protect, fuse):
        super().__init__()
        self.args = (r, ratio_milli, protect, mode, 0.3, 500, fuse)
        self.mode = mode

    def forward(self, x, metric, size, source, importance):
        return ops.merge_tokens(x, metric, size, source, importance if self.mode == "prune" else None, *self.args)


# Unit-free directions with exactly representable norms: every cosine is an exact binary fraction.
_PROTOTYPES = torch.tensor([[1., 1, 1, 1], [1, -1, 1, -1], [4, 0, 0, 0], [0, 0, -0.25, 0.25]])


def _merge_inputs(batch: int, length: int, seed: int, ties: bool):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, 8, generator=gen)
    if ties:  # repeated directions at power-of-two scales: many exactly equal similarities and best matches
        scale = 2.0 ** torch.randint(-2, 3, (batch, length, 1), generator=gen)
        metric = (_PROTOTYPES[torch.randint(0, 4, (batch, length), generator=gen)] * scale)[:, None]
        metric = metric.expand(batch, 2, length, 4).contiguous()
    else:
        metric = torch.randn(batch, 2, length, 4, generator=gen)
    size = torch.randint(1, 4, (batch, length), generator=gen).float()  # merged tokens of several sizes
    size[-1, : length // 3] = 0  # padding at the start of the last row
    if batch > 1:
        size[0, length // 2] = 0  # and an empty slot inside the first
    source = torch.randint(0, length, (batch, length + 3), generator=gen)
    source[-1, :4] = -source[-1, :4] - 1  # original padding is stored as -(slot + 1)
    importance = torch.randint(0, 4, (batch, length), generator=gen).float() / 4  # tied importances
    return x, metric, size, source, importance


@pytest.mark.parametrize("mode, r, ratio_milli, protect, fuse", [
    ("bipartite", 2, -1, [0], True),
    ("bipartite", 0, 300, [0, 2], True),
    ("threshold", 4, -1, [1], True),
    ("prune", 0, 300, [0], True),
    ("prune", 3, -1, [], False),
    ("bipartite", 4, 300, [0], True),  # ratio of the tokens beyond the first 4 (min_tokens)
    ("threshold", 3, 400, [0], True),
])
def test_merge_tokens_matches_reference_with_ties(mode, r, ratio_milli, protect, fuse, tmp_path):
    module = _Merge(mode, r, ratio_milli, protect, fuse)
    batch, length = Dim("batch", min=1), Dim("length", min=4)
    dynamic = ({0: batch, 1: length}, {0: batch, 2: length}, {0: batch, 1: length},
               {0: batch, 1: Dim("original", min=4)}, {0: batch, 1: length})
    session = _export(module, _merge_inputs(2, 12, 0, True), dynamic, tmp_path / "merge.onnx")
    names = ["x", "metric", "size", "source", "importance"]
    for b, n, seed, ties in itertools.product((1, 3), (9, 16, 31), (0, 1), (True, False)):
        args = _merge_inputs(b, n, seed, ties)
        expected = module(*args)
        x, size, source = _run(session, names, args)
        where = f"batch {b}, length {n}, seed {seed}, ties {ties}"
        assert torch.equal(source, expected[2]), where
        torch.testing.assert_close(size, expected[1], atol=1e-6, rtol=0, msg=where)
        torch.testing.assert_close(x, expected[0], atol=1e-5, rtol=0, msg=where)


class _StateOps(torch.nn.Module):
    """merge_init (float and bool masks), cls_importance (bool / float bias, GQA), merge_bias, unmerge."""

    def forward(self, x, q, k, mask):
        allowed = mask == 0
        size, source = ops.merge_init(x, mask)
        size_bool, _ = ops.merge_init(x, allowed)
        size_none, _ = ops.merge_init(x, None)
        scale = q.shape[-1] ** -0.5
        return (size, source, size_bool, size_none,
                ops.cls_importance(q, k, allowed, 0.3, 1), ops.cls_importance(q, k, mask, None, 0),
                ops.cls_importance(q, q, None, scale, 0),
                ops.merge_bias(size * 3, x, True), ops.merge_bias(size * 3, x.half(), False),
                ops.unmerge(x, source.flip(1)))


def _state_inputs(batch: int, length: int):
    gen = torch.Generator().manual_seed(batch * 100 + length)
    x = torch.randn(batch, length, 8, generator=gen)
    q, k = torch.randn(batch, 4, length, 8, generator=gen), torch.randn(batch, 2, length, 8, generator=gen)
    lowest = torch.finfo(torch.float32).min
    mask = torch.zeros(batch, 1, length, length)
    mask[-1, :, :, : length // 3] = lowest  # padded keys
    if batch > 1:
        mask[0, :, 1:, 2] = lowest  # key 2 seen by query 0 only: still a valid key
        mask[0, :, 0, 3] = lowest  # key 3 hidden from query 0 only (the CLS row importance reads)
    return x, q, k, mask


def test_state_ops_match_reference(tmp_path):
    module = _StateOps()
    batch, length = Dim("batch", min=1), Dim("length", min=4)
    dynamic = ({0: batch, 1: length}, {0: batch, 2: length}, {0: batch, 2: length},
               {0: batch, 2: length, 3: length})
    session = _export(module, _state_inputs(2, 6), dynamic, tmp_path / "state.onnx")
    for b, n in [(1, 5), (3, 9), (2, 16)]:
        args = _state_inputs(b, n)
        expected = module(*args)
        actual = _run(session, ["x", "q", "k", "mask"], args)
        assert len(actual) == len(expected)
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert a.dtype == e.dtype and a.shape == e.shape, (i, a.dtype, e.dtype, a.shape, e.shape)
            torch.testing.assert_close(a, e, atol=1e-6, rtol=0, msg=lambda m: f"output {i}, batch {b}: {m}")
