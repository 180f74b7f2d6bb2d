"""Identity: with no configs, optimize() computes exactly what the model computes."""
import pytest
import torch

import dynasparse
from dynasparse.runtime.ort import flat_outputs

from conftest import ARCHITECTURES, EXPECTED_SITES, load, make_inputs

_optimized: dict[tuple[str, bool], dynasparse.OptimizedModel] = {}


def optimized(name: str, with_mask: bool = True) -> dynasparse.OptimizedModel:
    key = (name, with_mask)
    if key not in _optimized:
        entry = load(name)
        inputs = entry.make_inputs(2, 12)
        if not with_mask:
            inputs.pop("attention_mask")
        _optimized[key] = dynasparse.optimize(entry.model, [], example_kwargs=inputs)
    return _optimized[key]


def assert_same_outputs(expected, actual, atol=1e-5):
    expected, actual = flat_outputs(expected), flat_outputs(actual)
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual):
        assert e.shape == a.shape
        torch.testing.assert_close(a, e, atol=atol, rtol=0)


@pytest.mark.parametrize("name", ARCHITECTURES)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("padded", [False, True])
def test_identity(name, batch, padded):
    entry = load(name)
    inputs = make_inputs(entry, batch, 10, padded)
    with torch.no_grad():
        assert_same_outputs(entry.model(**inputs), optimized(name)(**inputs))


TEXT_MODELS_WITH_OPTIONAL_MASK = [n for n in ARCHITECTURES if n != "vit-tiny" and not n.startswith("examples.")]


@pytest.mark.parametrize("name", TEXT_MODELS_WITH_OPTIONAL_MASK)
@pytest.mark.parametrize("batch", [1, 3])
def test_identity_without_attention_mask(name, batch):
    entry = load(name)
    inputs = {"input_ids": entry.make_inputs(batch, 9)["input_ids"]}
    with torch.no_grad():
        assert_same_outputs(entry.model(**inputs), optimized(name, with_mask=False)(**inputs))


@pytest.mark.parametrize("name", ARCHITECTURES + ["bert-tiny-eager", "llama-tiny-eager"])
def test_finds_every_attention_site(name):
    model = optimized(name) if name in ARCHITECTURES else dynasparse.optimize(
        load(name).model, [], example_kwargs=load(name).make_inputs(2, 8))
    report = model.report
    assert len(report.analysis.sites) == EXPECTED_SITES[name]
    assert report.passes[0].pass_name == "canonicalize"
    assert report.passes[0].num_matches == EXPECTED_SITES[name]
    assert not report.left_dense
    graph_ops = [n.target for n in model.graph_module.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.scaled_dot_product_attention.default not in graph_ops
    assert torch.ops.aten.softmax.int not in graph_ops


def test_eager_attention_is_rewritten_exactly_enough():
    entry = load("llama-tiny-eager")
    model = dynasparse.optimize(entry.model, [], example_kwargs=entry.make_inputs(2, 8))
    inputs = entry.make_inputs(3, 11)
    with torch.no_grad():
        assert_same_outputs(entry.model(**inputs), model(**inputs))


def test_positional_call_like_the_original():
    entry = load("bert-tiny")
    inputs = entry.make_inputs(2, 8)
    model = optimized("bert-tiny")
    with torch.no_grad():
        assert_same_outputs(entry.model(inputs["input_ids"], inputs["attention_mask"]),
                            model(inputs["input_ids"], inputs["attention_mask"]))


def test_half_precision_model():
    entry = load("llama-tiny")
    model = dynasparse.optimize(entry.model.to(torch.bfloat16), [], example_kwargs=entry.make_inputs(2, 8))
    try:
        inputs = entry.make_inputs(3, 10)
        with torch.no_grad():
            assert_same_outputs(entry.model(**inputs), model(**inputs), atol=0)
    finally:
        entry.model.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_keeps_real_casts_and_drops_no_op_ones(dtype):
    """An fp32 RMSNorm's casts to fp32 and export's dtype asserts compute nothing and go; bf16's casts stay."""
    entry = load("llama-tiny")
    try:
        graph = dynasparse.optimize(entry.model.to(dtype), [], example_kwargs=entry.make_inputs(2, 8)).graph_module.graph
        assert all(node.target is not torch.ops.aten._assert_tensor_metadata.default for node in graph.nodes)
        casts = [(node.args[0].meta["val"].dtype, node.args[1]) for node in graph.nodes
                 if node.target is torch.ops.aten.to.dtype]
        assert all(source != target for source, target in casts)
        assert ((torch.bfloat16, torch.float32) in casts) == (dtype == torch.bfloat16)  # RMSNorm's upcast
    finally:
        entry.model.float()


def test_report_is_readable():
    text = str(optimized("minilm").report)
    assert "6 attention sites, 6 blocks" in text
    assert "encoder.layer.5.attention.self" in text
    assert "canonicalize" in text
    assert optimized("minilm").report.to_dict()["sites"][0]["heads"] == 12


def test_a_sliced_example_captures_a_graph_that_takes_ordinary_inputs():
    """A non-contiguous example (a slice of a longer batch) must not tie the graph's guards to its strides."""
    entry = load("llama-tiny")
    inputs = entry.make_inputs(2, 24)
    sliced = {name: value[:, :12] for name, value in inputs.items()}
    model = dynasparse.optimize(entry.model, [], example_kwargs=sliced)
    fresh = entry.make_inputs(2, 16)
    with torch.no_grad():
        assert_same_outputs(entry.model(**fresh), model(**fresh))
