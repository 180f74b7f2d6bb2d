"""MLP width: fitted magnitude thresholds in front of the MLPs' matmuls (TEAL), set by dynasparse.fit."""
import json
import shutil

import pytest
import torch

import dynasparse
from dynasparse import DynasparseError, MLPSkipConfig, MLPWidthConfig
from dynasparse.ir.ops import CHANNEL_SPARSIFY, ROW_SPARSE_LINEAR
from dynasparse.kernels.mlp_width import sparsify, sparsify_reference
from dynasparse.plans import MLP_WIDTH_META

from default_configs import MLP_GATES, MLP_WIDTHS as FITTED, decoder_prompts, llama
from test_mlp_skip import _gpt2, _ids


def _optimized(model, configs=None):
    return dynasparse.optimize(model, configs or MLPWidthConfig(), example_kwargs={"input_ids": _ids(2)})


@pytest.mark.parametrize("build", [llama, _gpt2], ids=["llama", "gpt2"])
def test_unfitted_thresholds_keep_every_channel(build):
    model = build()
    optimized = _optimized(model)
    plan = optimized.graph_module.meta[MLP_WIDTH_META]
    assert len(plan.blocks) == len(optimized.report.analysis.blocks)
    # one threshold on the MLP's input (read by gate and up, or c_fc) and one on the inner activation
    assert [site.depth for site in plan.blocks[0]] == [0, 1]
    ids = _ids(3)
    with torch.no_grad():
        torch.testing.assert_close(optimized(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)


def test_channel_sparsify_zeroes_small_entries_only():
    x = torch.tensor([[-2.0, 0.5, -0.1, 1.0]])
    assert torch.equal(CHANNEL_SPARSIFY(x, torch.tensor(0.6)), torch.tensor([[-2.0, 0.0, 0.0, 1.0]]))
    assert torch.equal(CHANNEL_SPARSIFY(x, torch.tensor(0.0)), x)
    torch.library.opcheck(CHANNEL_SPARSIFY, (torch.randn(2, 5, 8), torch.tensor(0.3)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_one_pass_sparsify_equals_the_reference_at_ties(dtype):
    x = torch.randn(3, 64).to(dtype)
    threshold = x[0, :8].abs().median().float()
    x[1, :3] = torch.stack([threshold, -threshold, torch.nextafter(threshold, torch.tensor(0.0))]).to(dtype)
    for t in (threshold, torch.tensor(0.0)):
        assert torch.equal(sparsify(x, t), sparsify_reference(x, t))


@pytest.mark.parametrize("rows", [1, 3])  # 1: the C++ kernel (where it builds); 3: the dense matmul
def test_row_sparse_linear_equals_the_dense_matmul(rows):
    x = torch.randn(rows, 40)
    x[x.abs() < 0.7] = 0
    x[:, :6] = 0  # channels zero in every row: their weight rows are skipped
    weight_t, bias, threshold = torch.randn(40, 72), torch.randn(72), torch.tensor(1.1)
    kept = CHANNEL_SPARSIFY(x, threshold)
    torch.testing.assert_close(ROW_SPARSE_LINEAR(x, weight_t, bias, threshold), kept @ weight_t + bias)
    torch.testing.assert_close(ROW_SPARSE_LINEAR(x[None], weight_t, None, threshold), (kept @ weight_t)[None])


def test_fitted_matmuls_become_row_sparse_unless_asked_not_to():
    def count(config):
        optimized = _optimized(llama(), config)
        return sum(n.target is ROW_SPARSE_LINEAR for n in optimized.graph_module.graph.nodes), optimized.report
    lowered, report = count(MLPWidthConfig(target_skip=0.5, fitted=FITTED))
    assert lowered == 6 and any("input-major" in note for p in report.passes for note in p.notes)  # 3 per block
    with pytest.raises(DynasparseError, match="inside its matmuls"):
        dynasparse.fit(_optimized(llama(), MLPWidthConfig(target_skip=0.5, fitted=FITTED)), _ids(), progress=False)
    assert count(MLPWidthConfig(target_skip=0.5, fitted=FITTED, row_sparse=False))[0] == 0
    assert count(MLPWidthConfig(target_skip=0.5))[0] == 0  # nothing zeroed yet: the model's own matmuls


def test_fit_reaches_the_target_and_leaves_the_model_alone(tmp_path):
    model = llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimized = _optimized(model, MLPWidthConfig(target_skip=0.4))
    report = dynasparse.fit(optimized, _ids(), save=tmp_path / "widths.safetensors", progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # bit for bit
    assert 0.35 <= report.skipped_total <= 0.45 and report.held_out_kl < 0.01
    assert set(report.splits) and report.steps == 0
    layout = json.loads((tmp_path / "widths.safetensors.json").read_text())
    assert layout["config"]["target_skip"] == 0.4 and len(layout["modules"]) == 4
    again = _optimized(llama(), MLPWidthConfig(target_skip=0.4))
    dynasparse.fit(again, _ids(), progress=False)  # no randomness: the same thresholds
    for name, module in optimized.graph_module.named_modules():
        if name.startswith("mlp_width_"):
            assert torch.equal(module.threshold, again.graph_module.get_submodule(name).threshold)


def test_fitted_thresholds_load_by_config_and_zero_channels():
    model, ids = llama(), _ids(3)
    optimized = _optimized(model, MLPWidthConfig(target_skip=0.5, fitted=FITTED))
    with torch.no_grad():
        assert not torch.equal(optimized(input_ids=ids).logits, model(input_ids=ids).logits)
    config = MLPWidthConfig(target_skip=0.5, fitted=FITTED)
    assert MLPWidthConfig.from_dict(json.loads(config.to_json())) == config


def test_compiled_keeps_the_fitted_thresholds():
    """Dynamo traces the thresholds as buffers of the graph (batched == alone: the default list)."""
    optimized, ids = _optimized(llama(), MLPWidthConfig(target_skip=0.5, fitted=FITTED)), _ids(3)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(optimized, backend="eager")(input_ids=ids).logits,
                                   optimized(input_ids=ids).logits, atol=0, rtol=0)


def test_width_inside_routed_mlps():
    """Thresholds go in first (an earlier stage), and the routers move them into the routed MLP with the rest:
    at zero sparsity the pair is the model, fitted they run together."""
    model, ids = llama(), _ids(3)
    zero = _optimized(model, [MLPWidthConfig(), MLPSkipConfig()])
    assert not zero.report.left_dense
    with torch.no_grad():
        torch.testing.assert_close(zero(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)
        both = _optimized(model, [MLPWidthConfig(target_skip=0.5, fitted=FITTED),
                                  MLPSkipConfig(target_skip=0.5, fitted=MLP_GATES)])
        assert torch.isfinite(both(input_ids=ids).logits).all()


def test_loading_into_another_model_names_the_mismatch(tmp_path):
    path = tmp_path / "widths.safetensors"
    shutil.copy(FITTED, path)
    shutil.copy(FITTED + ".json", str(path) + ".json")
    with pytest.raises(DynasparseError, match="fitted on another model or config.*mlp_width_2"):
        _optimized(llama(layers=3), MLPWidthConfig(fitted=str(path)))


@pytest.mark.parametrize("call, message", [
    (lambda: MLPWidthConfig(target_skip=1.0), r"target_skip=1.0 is out of range"),
    (lambda: MLPWidthConfig(target_skip=0.0), r"target_skip=0.0 is out of range"),
    (lambda: MLPWidthConfig(fitted="nowhere.safetensors"), "is not a file"),
    (lambda: dynasparse.fit(_optimized(llama()), _ids(rows=4)), "at least batch_size"),
    (lambda: dynasparse.fit(_optimized(llama()), _ids().float()), "token ids"),
    (lambda: dynasparse.fit(_optimized(llama(), [MLPWidthConfig(), MLPSkipConfig()]), _ids(), save="x"),
     "one kind of gate per file"),
])
def test_bad_input_fails_clearly(call, message):
    with pytest.raises(DynasparseError, match=message):
        call()


def test_fitted_widths_over_a_bounded_cache_batched_equal_alone():
    model, (ids, mask) = llama(), decoder_prompts()
    kv = dynasparse.KVEvictionConfig(policy="h2o", budget=12, sink=2, recent=4, chunk_size=5)
    kwargs = dict(max_new_tokens=6, configs=[MLPWidthConfig(target_skip=0.5, fitted=FITTED)], kv=kv)
    batched = dynasparse.generate(model, ids, mask, **kwargs).sequences
    for row in range(ids.shape[0]):
        alone = dynasparse.generate(model, ids[row:row + 1, mask[row].bool()], **kwargs).sequences
        assert torch.equal(batched[row, -6:], alone[0, -6:])
