"""Sparse attention pass: keep-all is dense everywhere, rows are independent, short inputs stay dense."""
import onnx
import pytest
import torch
import torch._dynamo

import dynasparse
from dynasparse.export.sparse_attention import SPELLED_ESTIMATORS
from dynasparse.ir.ops import BLOCK_PLAN
from dynasparse.kernels.estimators import ESTIMATORS
from dynasparse.runtime.ort import flat_outputs

from conftest import load, make_inputs
from test_optimize import assert_same_outputs

DECODERS = ["llama-tiny", "qwen2-tiny", "mistral-tiny", "gpt2-tiny", "llama-tiny-eager"]


def config(**kwargs) -> dynasparse.SparseAttentionConfig:
    kwargs.setdefault("block_size", 16)
    kwargs.setdefault("min_seq_len", 0)
    if not {"keep_ratio", "top_k", "mass"} & set(kwargs):
        kwargs["keep_ratio"] = 1.0
    return dynasparse.SparseAttentionConfig(**kwargs)


def sparse(name: str, length: int = 70, **kwargs) -> dynasparse.OptimizedModel:
    entry = load(name)
    return dynasparse.optimize(entry.model, [config(**kwargs)], example_kwargs=entry.make_inputs(2, length))


@pytest.mark.parametrize("name", DECODERS + ["bert-tiny", "vit-tiny"])
def test_keep_all_blocks_is_dense(name):
    entry = load(name)
    model = sparse(name, 40 if name == "vit-tiny" else 70)
    assert all(site.sparse for site in model.report.analysis.sites)
    for batch, padded in [(1, False), (3, True)]:
        inputs = make_inputs(entry, batch, 55, padded)
        with torch.no_grad():
            assert_same_outputs(entry.model(**inputs), model(**inputs))


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_every_estimator_keeps_all_at_ratio_one(estimator):
    entry = load("llama-tiny")
    model = sparse("llama-tiny", estimator=estimator, window=8)
    inputs = make_inputs(entry, 3, 64, True)
    with torch.no_grad():
        assert_same_outputs(entry.model(**inputs), model(**inputs))


@pytest.mark.parametrize("name, causal", [("llama-tiny", True), ("gpt2-tiny", True), ("bert-tiny", False)])
def test_a_causal_mask_tensor_makes_the_site_causal(name, causal):
    """Hugging Face passes causality as a mask tensor with is_causal=False: plans that did not know would
    spend their budget on blocks past the diagonal (which the mask then hides)."""
    model = sparse(name, keep_ratio=0.5)
    plans = [n for n in model.graph_module.graph.nodes if n.target is BLOCK_PLAN]
    assert plans and all(n.args[3] is causal for n in plans)


@pytest.mark.slow
def test_keep_all_blocks_is_dense_compiled():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    entry = load("llama-tiny")
    compiled = torch.compile(entry.model, backend="dynasparse", options={"configs": [config()]})
    for batch, padded in [(2, False), (3, True)]:
        inputs = make_inputs(entry, batch, 50, padded)
        with torch.no_grad():
            assert_same_outputs(entry.model(**inputs), compiled(**inputs))
    assert not torch._dynamo.utils.counters["graph_break"]


@pytest.mark.parametrize("kwargs", [dict(mass=0.8), dict(top_k=2, min_seq_len=32),
                                    dict(keep_ratio=0.4, estimator="streaming")])
@pytest.mark.slow
def test_onnx_runtime_matches(kwargs, tmp_path):
    """The exported plan matches the optimized model's (keep-all is the model: tests in torch above)."""
    entry = load("llama-tiny")
    model = sparse("llama-tiny", **kwargs)
    path = dynasparse.export_onnx(model, tmp_path / "sparse.onnx")
    assert {n.domain for n in onnx.load(str(path)).graph.node} <= {"", "ai.onnx"}
    session = dynasparse.ort_session(path)
    for batch, length in [(2, 70), (3, 45)]:
        inputs = make_inputs(entry, batch, length, True)
        with torch.no_grad():
            expected = flat_outputs(model(**inputs))
        for e, a in zip(expected, session(**inputs)):
            torch.testing.assert_close(a, e, atol=1e-5, rtol=0)


def test_sparse_rows_are_independent_of_the_batch():
    entry = load("qwen2-tiny")
    model = sparse("qwen2-tiny", keep_ratio=0.3)
    inputs = make_inputs(entry, 3, 64, True)
    with torch.no_grad():
        batched = flat_outputs(model(**inputs))[0]
        for row in range(3):
            alone = flat_outputs(model(**{k: v[row:row + 1] for k, v in inputs.items()}))[0]
            torch.testing.assert_close(batched[row:row + 1], alone, atol=1e-5, rtol=0)


def test_sparse_changes_outputs_and_plans_per_kv_head():
    entry = load("llama-tiny")
    model = sparse("llama-tiny", keep_ratio=0.25)
    inputs = make_inputs(entry, 2, 96, False)
    with torch.no_grad():
        assert not torch.allclose(flat_outputs(entry.model(**inputs))[0], flat_outputs(model(**inputs))[0])
    plans = [n for n in model.graph_module.graph.nodes if n.target is BLOCK_PLAN]
    assert len(plans) == 2
    counts = plans[0].meta["val"][0]
    assert counts.shape[1] == entry.model.config.num_key_value_heads  # one plan per KV head, no repeat_kv


def test_short_sequences_stay_dense_and_are_reported():
    entry = load("llama-tiny")
    model = sparse("llama-tiny", length=40, keep_ratio=0.25, min_seq_len=64)
    report = str(model.report)
    assert "dense at the example's 40 keys" in report and "block-sparse" in report
    with torch.no_grad():
        short = make_inputs(entry, 2, 40, True)
        assert_same_outputs(entry.model(**short), model(**short))
        long = make_inputs(entry, 2, 96, False)
        assert not torch.allclose(flat_outputs(entry.model(**long))[0], flat_outputs(model(**long))[0])


def test_layers_filter_and_report():
    model = sparse("llama-tiny", keep_ratio=0.5, layers=(1,))
    assert [s.sparse for s in model.report.analysis.sites] == [False, True]
    assert "layer 1: pooled / keep_ratio 0.5" in str(model.report)
    assert model.report.flops_saved > 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(keep_ratio=0.0), r"keep_ratio=0.0 is out of range"),
    (dict(keep_ratio=1.5), r"keep_ratio=1.5 is out of range"),
    (dict(mass=2.0), r"mass=2.0 is out of range"),
    (dict(keep_ratio=0.5, top_k=2), r"set exactly one of"),
    (dict(block_size=48, keep_ratio=0.5), r"power of two >= 16"),
    (dict(block_size=8, keep_ratio=0.5), r"power of two >= 16"),
    (dict(top_k=0), r"top_k=0 must be an int >= 1"),
    (dict(top_k=20, min_seq_len=64), r"set min_seq_len >= 1280"),
    (dict(keep_ratio=0.5, estimator="magic"), r"estimator='magic'"),
])
def test_bad_settings_are_clear_errors(kwargs, message):
    with pytest.raises(dynasparse.DynasparseError, match=message):
        dynasparse.SparseAttentionConfig(**kwargs)


def test_top_k_beyond_the_blocks_is_a_clear_error():
    with pytest.raises(dynasparse.DynasparseError, match=r"top_k=8 blocks of 16 tokens is more than a sequence"):
        sparse("llama-tiny", top_k=8, min_seq_len=0)


def test_layers_matching_nothing_is_a_clear_error():
    with pytest.raises(dynasparse.DynasparseError, match=r"matches no attention layer"):
        sparse("llama-tiny", keep_ratio=0.5, layers=(7,))


@pytest.mark.parametrize("estimator", [name for name in ESTIMATORS if name not in SPELLED_ESTIMATORS])
def test_export_of_an_unspelled_estimator_is_a_clear_error(estimator, tmp_path):
    model = sparse("llama-tiny", keep_ratio=0.5, estimator=estimator)
    with pytest.raises(Exception, match=rf"estimator='{estimator}'\) has no ONNX translation"):
        dynasparse.export_onnx(model, tmp_path / "unspelled.onnx")
