"""Token merging: identity at zero, shapes kept, row independence, clear errors, dense fallbacks."""
import pytest
import torch

import dynasparse
from dynasparse import DynasparseError, TokenMergeConfig
from dynasparse.ir.ops import MERGE_TOKENS, UNMERGE

from conftest import load

MODES = [TokenMergeConfig.tome(r=2), TokenMergeConfig.tome(keep_ratio=0.6), TokenMergeConfig.tome(r=(2, 2, 1, 1, 0, 1)),
         TokenMergeConfig.tome(keep_ratio=0.6, mode="prune"), TokenMergeConfig.tome(keep_ratio=0.6, mode="prune", fuse_pruned=False),
         TokenMergeConfig.tome(r=2, mode="threshold", threshold=0.2)]


def merged(name, config, batch=2, seq_len=16):
    entry = load(name)
    return entry, dynasparse.optimize(entry.model, [config], example_kwargs=entry.make_inputs(batch, seq_len))


@pytest.mark.parametrize("name", ["bert-tiny", "minilm", "vit-tiny"])
@pytest.mark.parametrize("config", [TokenMergeConfig.tome(r=0), TokenMergeConfig.tome(keep_ratio=1.0),
                                    TokenMergeConfig.tome(keep_ratio=1.0, mode="prune")])
def test_zero_merging_is_the_identity(name, config):
    entry, model = merged(name, config)
    assert model.report.passes[1].num_matches == len(model.report.analysis.blocks)
    for batch in (1, 3):
        inputs = entry.make_inputs(batch, 13)
        with torch.no_grad():
            expected, actual = entry.model(**inputs), model(**inputs)
        for e, a in zip(expected.values(), actual.values()):
            torch.testing.assert_close(a, e, atol=1e-5, rtol=0)


@pytest.mark.parametrize("config", MODES, ids=lambda c: f"{c.mode}-{c.r}-{c.keep_ratio}-{c.metric}-{c.fuse_pruned}")
def test_dense_outputs_keep_their_shape_and_rows_are_independent(config):
    entry, model = merged("minilm", config, seq_len=20)
    graph_ops = [n.target for n in model.graph_module.graph.nodes]
    assert graph_ops.count(MERGE_TOKENS) == 6 and graph_ops.count(UNMERGE) == 1
    inputs = entry.make_inputs(3, 20)  # the last row is left-padded
    inputs["attention_mask"][1, 15:] = 0  # and this one right-padded
    with torch.no_grad():
        batched = model(**inputs)
        assert batched.last_hidden_state.shape == (3, 20, 384)
        assert batched.pooler_output.shape == (3, 384)
        for row in range(3):  # each row alone, with its padding, gives the same result
            alone = model(**{k: v[row:row + 1] for k, v in inputs.items()})
            torch.testing.assert_close(alone.last_hidden_state[0], batched.last_hidden_state[row], atol=2e-5, rtol=0)
        for row in (0, 1):  # and a right-padded row equals the same text without padding
            real = int(inputs["attention_mask"][row].sum())
            alone = model(**{k: v[row:row + 1, :real] for k, v in inputs.items()})
            torch.testing.assert_close(alone.last_hidden_state[0], batched.last_hidden_state[row, :real],
                                       atol=2e-5, rtol=0)


def test_merging_removes_tokens_and_reports_it():
    _, model = merged("minilm", TokenMergeConfig.tome(keep_ratio=0.5), seq_len=64)
    report = model.report
    sites = report.analysis.sites
    assert sites[0].example_shape[1] == 64 and sites[-1].example_shape[1] < 64 * 0.65
    assert report.flops_saved > 0
    assert "token_merge" in str(report) and "kept" in str(report)


def test_protected_cls_token_is_never_merged(monkeypatch):
    """After every merge, the slot holding CLS stands for exactly one token, with or without left padding."""
    from dynasparse.kernels import token_merge

    entry, model = merged("minilm", TokenMergeConfig.tome(keep_ratio=0.4, protect=(0,)), seq_len=24)
    steps = []
    original = token_merge.merge_tokens_reference

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        steps.append(out)
        return out

    monkeypatch.setattr(token_merge, "merge_tokens_reference", spy)
    inputs = entry.make_inputs(2, 24)  # the last row is left-padded: its CLS sits after the padding
    cls_position = [0, 24 // 4]
    with torch.no_grad():
        model(**inputs)
    assert len(steps) == 6
    for _, size, source in steps:
        for row, position in enumerate(cls_position):
            assert size[row, token_merge.slot_of(source)[row, position]] == 1
    assert steps[-1][1].sum(dim=1).tolist() == inputs["attention_mask"].sum(dim=1).float().tolist()


def test_decoder_blocks_stay_dense_and_are_reported():
    entry = load("llama-tiny")
    model = dynasparse.optimize(entry.model, [TokenMergeConfig.tome(r=2)], example_kwargs=entry.make_inputs(2, 12))
    assert model.report.passes[1].num_matches == 0
    assert all("causal attention" in why for why in model.report.left_dense.values())
    inputs = entry.make_inputs(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs)[0], entry.model(**inputs)[0], atol=1e-5, rtol=0)


def test_selected_layers_only():
    _, model = merged("minilm", TokenMergeConfig.tome(r=2, layers=(4, 5)))
    assert [line.split(":")[0] for line in model.report.passes[1].applied] == ["block 4", "block 5"]


def test_constant_r_is_capped_per_row_where_a_row_is_too_short():
    """ToMe's behaviour: a row merges at most half of its unprotected tokens; the report says where the
    example was capped, and a short batch runs (each row as it runs alone)."""
    entry, model = merged("minilm", TokenMergeConfig.tome(r=8), seq_len=12)
    assert "capped at 6" in model.report.passes[1].applied[0]
    inputs = entry.make_inputs(3, 6)
    inputs["attention_mask"][2, :2] = 0
    with torch.no_grad():
        batched = model(**inputs).last_hidden_state
        assert batched.shape == (3, 6, 384) and torch.isfinite(batched).all()
        alone = model(**{k: v[2:] for k, v in inputs.items()}).last_hidden_state
    torch.testing.assert_close(alone[0], batched[2], atol=2e-5, rtol=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=2, protect=(0, 40)), "beyond the example"),
    (dict(keep_ratio=0.01), "at most 50%"),
    (dict(r=(1, 2)), "2 values for 5 merged blocks"),
])
def test_invalid_settings_for_the_model(kwargs, message):
    with pytest.raises(DynasparseError, match=message):
        merged("minilm", TokenMergeConfig(**kwargs), seq_len=16)


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "exactly one of r"), (dict(r=2, keep_ratio=0.5), "exactly one of r"),
    (dict(keep_ratio=0.0), "keep_ratio=0.0 is out of range"), (dict(keep_ratio=1.5), "out of range"),
    (dict(r=-1), "non-negative"), (dict(r=2, mode="tome"), "mode='tome'"),
    (dict(r=2, threshold=0.5), "only used with mode='threshold'"),
    (dict(r=2, mode="threshold", threshold=2.0), r"lie in \[-1, 1\]"),
    (dict(r=2, protect=(-1,)), "token positions"),
])
def test_invalid_config_values(kwargs, message):
    with pytest.raises(DynasparseError, match=message):
        TokenMergeConfig(**kwargs)


def test_config_round_trips_json():
    config = TokenMergeConfig.tome(r=(2, 3), mode="threshold", threshold=(0.5, 0.6), protect=(0, 1))
    assert dynasparse.BaseConfig.from_json(config.to_json()) == config


def test_threshold_mode_calibrates_to_the_scheduled_average():
    entry = load("minilm")
    batches = [entry.make_inputs(4, 40) for _ in range(2)]
    config = TokenMergeConfig.tome(keep_ratio=0.5, mode="threshold", metric="hidden")
    model = dynasparse.optimize(entry.model, [config], example_kwargs=batches[0], calibration=batches)
    notes = " ".join(model.report.passes[1].notes)
    assert "thresholds calibrated on 2 batches" in notes
    thresholds = [n.args[9] for n in model.graph_module.graph.nodes if n.target is MERGE_TOKENS]
    assert len(thresholds) == 6 and all(-1.0 <= t <= 1.0 for t in thresholds) and len(set(thresholds)) > 1
    with torch.no_grad():
        assert model(**batches[1]).last_hidden_state.shape == (4, 40, 384)


def test_threshold_mode_without_calibration_or_threshold_is_an_error():
    entry = load("bert-tiny")
    with pytest.raises(DynasparseError, match="calibrates its thresholds"):
        dynasparse.optimize(entry.model, [TokenMergeConfig.tome(r=2, mode="threshold")],
                            example_kwargs=entry.make_inputs(2, 16))
    with pytest.raises(DynasparseError, match="calibration batch 0 does not fit"):
        dynasparse.optimize(entry.model, [TokenMergeConfig.tome(r=2, mode="threshold")],
                            example_kwargs=entry.make_inputs(2, 16), calibration=[{"pixel_values": torch.ones(1)}])


@pytest.mark.slow
def test_merged_model_compiles_without_graph_breaks():
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    entry = load("bert-tiny")
    config = TokenMergeConfig.tome(keep_ratio=0.6, metric="hidden")
    reports = []
    compiled = torch.compile(entry.model, backend="dynasparse",
                             options={"configs": [config], "on_report": reports.append})
    eager = dynasparse.optimize(entry.model, [config], example_kwargs=entry.make_inputs(3, 16))
    inputs = entry.make_inputs(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs).last_hidden_state, eager(**inputs).last_hidden_state,
                                   atol=1e-4, rtol=0)
    assert not torch._dynamo.utils.counters["graph_break"]
    assert reports[0].passes[1].num_matches == 2


def test_small_batches_run_the_dense_graph():
    """dense_below: a call with fewer mergeable tokens (batch × (length − min_tokens)) than the gate runs
    the graph as it was before merging, exactly; larger calls merge exactly as without the gate."""
    entry = load("minilm")
    example = entry.make_inputs(2, 16)
    gated = dynasparse.optimize(entry.model, [TokenMergeConfig.tome(keep_ratio=0.5, min_tokens=4, dense_below=40)],
                                example_kwargs=example)
    plain = dynasparse.optimize(entry.model, [TokenMergeConfig.tome(keep_ratio=0.5, min_tokens=4)], example_kwargs=example)
    assert "runs the dense graph" in str(gated.report)
    with torch.no_grad():
        for batch, seq_len, merges in ((1, 20, False), (2, 20, False), (3, 30, True)):
            inputs = entry.make_inputs(batch, seq_len)
            out = gated(**inputs).last_hidden_state
            assert gated.runner.last_call_merged is merges
            expected = (plain if merges else entry.model)(**inputs).last_hidden_state
            torch.testing.assert_close(out, expected, atol=1e-5 if not merges else 0, rtol=0)


@pytest.mark.slow
def test_dense_below_under_compile_and_export(tmp_path):
    import torch._dynamo

    torch._dynamo.reset()
    entry = load("bert-tiny")
    config = TokenMergeConfig.tome(keep_ratio=0.6, dense_below=10_000)
    reports = []
    compiled = torch.compile(entry.model, backend="dynasparse",
                             options={"configs": [config], "on_report": reports.append, "inductor": False})
    inputs = entry.make_inputs(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs).last_hidden_state, entry.model(**inputs).last_hidden_state,
                                   atol=1e-5, rtol=0)
    assert "compiled dense" in str(reports[0])
    gated = dynasparse.optimize(entry.model, [config], example_kwargs=inputs)
    with pytest.warns(UserWarning, match="merges at every batch size"):
        dynasparse.export_onnx(gated, tmp_path / "gated.onnx")


def test_dense_below_is_validated():
    with pytest.raises(DynasparseError, match="dense_below"):
        TokenMergeConfig.tome(r=1, dense_below=-1)
