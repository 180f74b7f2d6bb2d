"""Exit gates and the staged runtime: identity at a threshold that never fires, batched == per row, export."""
import pytest
import torch
import transformers as hf

import dynasparse
from dynasparse import DynasparseError, ExitGateConfig
from dynasparse.kernels.exit_gate import CRITERIA, exit_decision

VOCAB = 100


def _bert(num_labels: int = 5) -> hf.BertForSequenceClassification:
    torch.manual_seed(0)
    config = hf.BertConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                           vocab_size=VOCAB, num_labels=num_labels)
    return hf.BertForSequenceClassification(config).eval()


def _vit() -> hf.ViTForImageClassification:
    torch.manual_seed(0)
    config = hf.ViTConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
                          image_size=16, patch_size=4, num_channels=1, num_labels=4)
    return hf.ViTForImageClassification(config).eval()


def _llama() -> hf.LlamaForCausalLM:
    torch.manual_seed(0)
    config = hf.LlamaConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=128, vocab_size=VOCAB)
    return hf.LlamaForCausalLM(config).eval()


def _text(batch: int = 6, length: int = 12) -> dict:
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (batch, length))
    mask = torch.ones_like(ids)
    mask[-1, :4] = 0  # a padded row
    return {"input_ids": ids, "attention_mask": mask}


def _pixels(batch: int = 6) -> dict:
    torch.manual_seed(1)
    return {"pixel_values": torch.randn(batch, 1, 16, 16)}


MODELS = {"bert": (_bert, _text), "vit": (_vit, _pixels), "llama": (_llama, _text)}


def _mixed_threshold(model, inputs: dict, config: ExitGateConfig) -> float:
    """A threshold that lets some rows leave at the first gate and keeps others."""
    probe = dynasparse.optimize(model, config, example_kwargs=inputs)
    names = {n.name: n for n in probe.graph_module.graph.nodes}
    plan = probe.runner.plan
    from dynasparse.passes.exit_calibration import recorded_runs

    values, _ = next(recorded_runs(probe.graph_module, [inputs], {plan.gates[0].confidence}))
    assert names  # the gate node exists
    return float(values[plan.gates[0].confidence].median())


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("criterion", CRITERIA)
def test_threshold_one_is_the_full_model(name, criterion):
    build, make = MODELS[name]
    model, inputs = build(), make()
    optimized = dynasparse.optimize(model, ExitGateConfig(criterion=criterion, threshold=1.0), example_kwargs=inputs)
    with torch.no_grad():
        expected, got = model(**inputs).logits, optimized(**inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert optimized.exit_blocks.tolist() == [optimized.runner.plan.num_blocks - 1] * expected.shape[0]


@pytest.mark.parametrize("name", list(MODELS))
def test_batched_staged_rows_equal_rows_alone(name):
    build, make = MODELS[name]
    model, inputs = build(), make()
    config = ExitGateConfig(criterion="max_prob")
    threshold = _mixed_threshold(model, inputs, config)
    optimized = dynasparse.optimize(model, ExitGateConfig(criterion="max_prob", threshold=threshold),
                                    example_kwargs=inputs)
    with torch.no_grad():
        batched = optimized(**inputs).logits
        blocks = optimized.exit_blocks.clone()
        alone = []
        for row in range(batched.shape[0]):
            alone.append(optimized(**{k: v[row:row + 1] for k, v in inputs.items()}).logits)
            assert optimized.exit_blocks.item() == blocks[row]
    assert 0 < int((blocks == 0).sum()) < batched.shape[0], "the threshold should split the batch"
    torch.testing.assert_close(batched, torch.cat(alone), atol=1e-5, rtol=1e-4)


def test_exited_rows_carry_the_head_output_at_their_gate():
    model, inputs = _bert(), _text()
    threshold = _mixed_threshold(model, inputs, ExitGateConfig())
    optimized = dynasparse.optimize(model, ExitGateConfig(after_blocks=(0,), threshold=threshold),
                                    example_kwargs=inputs)
    with torch.no_grad():
        logits = optimized(**inputs).logits
        hidden = model.bert(**inputs, output_hidden_states=True).hidden_states[1]  # after block 0
        early = model.classifier(model.bert.pooler(hidden))
        full = model(**inputs).logits
    left = optimized.exit_blocks == 0
    torch.testing.assert_close(logits[left], early[left], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits[~left], full[~left], atol=1e-5, rtol=1e-4)


def test_patience_needs_agreeing_gates():
    confidence = torch.tensor([0.9, 0.9, 0.1])
    first, count = exit_decision(confidence, torch.tensor([1, 2, 3]), None, torch.zeros(3, dtype=torch.long), 0.0,
                                 "patience", 2)
    assert not first.any() and count.tolist() == [1, 1, 1]
    second, count = exit_decision(confidence, torch.tensor([1, 0, 3]), torch.tensor([1, 2, 3]), count, 0.5,
                                  "patience", 2)
    assert second.tolist() == [True, False, False] and count.tolist() == [2, 1, 2]


@pytest.mark.slow
def test_compiled_staged_model_equals_eager():
    model, inputs = _bert(), _text()
    threshold = _mixed_threshold(model, inputs, ExitGateConfig())
    optimized = dynasparse.optimize(model, ExitGateConfig(threshold=threshold), example_kwargs=inputs)
    compiled = torch.compile(optimized, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs).logits, optimized(**inputs).logits, atol=1e-5, rtol=1e-4)
        full = dynasparse.optimize(model, ExitGateConfig(threshold=1.0), example_kwargs=inputs)
        torch.testing.assert_close(torch.compile(full, backend="aot_eager")(**inputs).logits, model(**inputs).logits,
                                   atol=1e-6, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["staged", "whole_batch"])
def test_onnx_export_matches_torch(tmp_path, mode):
    """At a threshold where some rows exit and some do not (the identity at threshold 1: in torch, above)."""
    model, inputs = _bert(), _text()
    threshold = _mixed_threshold(model, inputs, ExitGateConfig(after_blocks=(1,)))
    optimized = dynasparse.optimize(model, ExitGateConfig(after_blocks=(1,), threshold=threshold, mode=mode),
                                    example_kwargs=inputs)
    path = dynasparse.export_onnx(optimized, tmp_path / f"{mode}.onnx")
    session = dynasparse.ort_session(path)
    with torch.no_grad():
        expected = optimized(**inputs).logits
    torch.testing.assert_close(session(**inputs)[0], expected, atol=1e-5, rtol=1e-4)
    if mode == "staged":
        assert session.last_exit_blocks.tolist() == optimized.exit_blocks.tolist()
    if mode == "whole_batch":
        import onnx

        assert any(node.op_type == "If" for node in onnx.load(path).graph.node)


def test_whole_batch_exits_only_when_every_row_is_confident():
    model, inputs = _bert(), _text()
    threshold = _mixed_threshold(model, inputs, ExitGateConfig())
    optimized = dynasparse.optimize(model, ExitGateConfig(threshold=threshold, mode="whole_batch"),
                                    example_kwargs=inputs)
    with torch.no_grad():
        torch.testing.assert_close(optimized(**inputs).logits, model(**inputs).logits, atol=1e-6, rtol=1e-5)
        optimized_low = dynasparse.optimize(model, ExitGateConfig(threshold=0.0, mode="whole_batch",
                                                                  after_blocks=(1,)), example_kwargs=inputs)
        hidden = model.bert(**inputs, output_hidden_states=True).hidden_states[2]
        torch.testing.assert_close(optimized_low(**inputs).logits, model.classifier(model.bert.pooler(hidden)),
                                   atol=1e-5, rtol=1e-4)


def test_calibration_meets_the_quality_target_and_reports_the_curve():
    model, inputs = _bert(num_labels=3), _text(batch=16)
    batches = [{k: v[i:i + 8] for k, v in inputs.items()} for i in (0, 8)]
    optimized = dynasparse.optimize(model, ExitGateConfig(max_quality_drop=0.0), example_kwargs=inputs,
                                    calibration=batches)
    plan = optimized.runner.plan
    assert plan.curve and all(0.0 <= row["quality_drop"] <= 1.0 for row in plan.curve)
    with torch.no_grad():
        assert torch.equal(optimized(**inputs).logits.argmax(-1), model(**inputs).logits.argmax(-1))
    assert any("chosen on 16 calibration rows" in note for r in optimized.report.passes for note in r.notes)
    fast = dynasparse.optimize(model, ExitGateConfig(target_speedup=1.2), example_kwargs=inputs, calibration=batches)
    chosen = next(row for row in fast.runner.plan.curve if row["threshold"] == fast.runner.plan.thresholds[0])
    assert chosen["est_speedup"] >= 1.2


def test_tuned_head_reads_intermediate_states_closer_to_the_final_ones():
    model, inputs = _bert(), _text(batch=16)
    tuned = dynasparse.optimize(model, ExitGateConfig(after_blocks=(0,), head="tuned", threshold=1.0),
                                example_kwargs=inputs, calibration=[inputs])
    weight = tuned.graph_module.exit_0_weight
    assert not torch.allclose(weight, torch.eye(weight.shape[0]))
    with torch.no_grad():
        hidden = model.bert(**inputs, output_hidden_states=True).hidden_states
        mapped = torch.nn.functional.linear(hidden[1], weight, tuned.graph_module.exit_0_bias)
        assert (mapped - hidden[-1]).norm() < (hidden[1] - hidden[-1]).norm()
        torch.testing.assert_close(tuned(**inputs).logits, model(**inputs).logits, atol=1e-6, rtol=1e-5)


def test_draft_mode_is_the_model_cut_after_its_gate():
    model, inputs = _llama(), _text()
    draft = dynasparse.optimize(model, ExitGateConfig(after_blocks=(0,), mode="draft"), example_kwargs=inputs)
    assert len(draft.report.analysis.sites) == 1
    with torch.no_grad():
        hidden = model.model(**inputs, output_hidden_states=True).hidden_states[1]
        expected = model.lm_head(model.model.norm(hidden))
        torch.testing.assert_close(draft(**inputs).logits, expected, atol=1e-5, rtol=1e-4)
    # the cut keeps the export's input guards: without them every call re-checks the inputs' symbolic
    # constraints in Python, which cost a tiny drafter more than its block
    full = dynasparse.optimize(model, [], example_kwargs=inputs)
    assert [n.target for n in draft.graph_module.graph.nodes if n.op == "call_module"] == \
        [n.target for n in full.graph_module.graph.nodes if n.op == "call_module"]


@pytest.mark.parametrize("config, calibration, message", [
    (dict(after_blocks=(3,)), None, "after the model has finished"),
    (dict(after_blocks=(0, 7)), None, "gate after block 7"),
    (dict(max_quality_drop=0.01), None, "pass optimize"),
    (dict(max_quality_drop=0.01), [{"input_ids": torch.zeros(2, 3, 4, dtype=torch.long)}], "does not fit"),
    (dict(target_speedup=50.0), "ok", "out of reach"),
    (dict(mode="draft"), None, "cut after one block"),
])
def test_bad_settings_fail_clearly(config, calibration, message):
    model, inputs = _bert(), _text()
    if calibration == "ok":
        calibration = [inputs]
    with pytest.raises(DynasparseError, match=message):
        dynasparse.optimize(model, ExitGateConfig(**config), example_kwargs=inputs, calibration=calibration)


@pytest.mark.parametrize("config, message", [
    (dict(criterion="confidence"), "not a known criterion"),
    (dict(threshold=1.5), r"in \[0, 1\]"),
    (dict(head="linear"), "head="),
    (dict(criterion="patience", mode="whole_batch"), "patience"),
    (dict(threshold=0.5, max_quality_drop=0.01), "drop threshold"),
    (dict(decode_schedule=(1, 3)), "not increasing"),
])
def test_bad_configs_fail_clearly(config, message):
    with pytest.raises(DynasparseError, match=message):
        ExitGateConfig(**config)


def _gpt2() -> hf.GPT2LMHeadModel:
    torch.manual_seed(0)
    return hf.GPT2LMHeadModel(hf.GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=VOCAB)).eval()


@pytest.mark.parametrize("build", [_llama, _gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("block", [0])  # a drafter the chooser picks: test_self_speculative_choosing_its_block...
def test_self_speculative_greedy_equals_plain_greedy(build, block):
    model = build()
    inputs = _text(batch=3, length=10)
    plain = dynasparse.generate(model, inputs["input_ids"], inputs["attention_mask"], max_new_tokens=24)
    draft = ExitGateConfig(after_blocks=(block,), mode="draft", draft_tokens=3)
    out = dynasparse.generate(model, inputs["input_ids"], inputs["attention_mask"], max_new_tokens=24, early_exit=draft)
    assert torch.equal(out.sequences, plain.sequences)
    assert out.stats.verify_steps < 24 * 3 and 0.0 <= out.stats.acceptance <= 1.0


@pytest.mark.parametrize("build", [_llama, _gpt2], ids=["llama", "gpt2"])
def test_self_speculative_choosing_its_block_equals_plain_greedy(build):
    """No after_blocks: the runtime picks among a quarter and half of the depth, or decodes plainly."""
    model = build()
    inputs = _text(batch=3, length=10)
    plain = dynasparse.generate(model, inputs["input_ids"], inputs["attention_mask"], max_new_tokens=24)
    out = dynasparse.generate(model, inputs["input_ids"], inputs["attention_mask"], max_new_tokens=24,
                              early_exit=ExitGateConfig(mode="draft"))
    assert torch.equal(out.sequences, plain.sequences)
    assert out.stats.draft_rounds["plain"] >= 1  # the first round measures a plain step
    assert set(out.stats.draft_rounds) <= {"plain", "blocks 0..0", "blocks 0..1"}
    assert sum(out.stats.draft_rounds.values()) == out.stats.verify_steps


def test_self_speculative_drafter_past_the_last_block_fails_clearly():
    with pytest.raises(DynasparseError, match="blocks 0..1, not 2"):
        dynasparse.generate(_llama(), torch.zeros(1, 4, dtype=torch.long), max_new_tokens=2,
                            early_exit=ExitGateConfig(after_blocks=(2,), mode="draft"))


def test_self_speculative_rows_stop_at_their_eos():
    model = _llama()
    inputs = _text(batch=3, length=10)
    plain = dynasparse.generate(model, inputs["input_ids"], inputs["attention_mask"], max_new_tokens=12)
    eos = int(plain.sequences[1, 14])  # row 1's fifth new token
    kwargs = dict(max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    expected = dynasparse.generate(model, inputs["input_ids"], inputs["attention_mask"], **kwargs).sequences
    out = dynasparse.generate(model, inputs["input_ids"], inputs["attention_mask"],
                              early_exit=ExitGateConfig(after_blocks=(0,), mode="draft"), **kwargs).sequences
    assert torch.equal(out[:, :expected.shape[1]], expected)
    assert (out[:, expected.shape[1]:] == 0).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=0.7), "greedy"),
    (dict(early_exit=ExitGateConfig(after_blocks=(0,), mode="whole_batch")), "mode='staged'"),
])
def test_self_speculative_bad_settings(kwargs, message):
    kwargs.setdefault("early_exit", ExitGateConfig(after_blocks=(0,), mode="draft"))
    with pytest.raises(DynasparseError, match=message):
        dynasparse.generate(_llama(), torch.zeros(1, 4, dtype=torch.long), max_new_tokens=2, **kwargs)


def test_compile_backend_points_to_optimize_for_exit_gates():
    model, inputs = _bert(), _text()
    compiled = torch.compile(model, backend="dynasparse", options={"configs": [ExitGateConfig()]})
    with pytest.raises(Exception, match="staged runtime"):
        compiled(**inputs)


@pytest.mark.parametrize("build", [_llama, _gpt2], ids=["llama", "gpt2"])
def test_per_token_exit_at_threshold_one_is_plain_greedy(build):
    model, inputs = build(), _text(batch=3, length=10)
    plain = dynasparse.generate(model, inputs["input_ids"], inputs["attention_mask"], max_new_tokens=12)
    out = dynasparse.generate(model, inputs["input_ids"], inputs["attention_mask"], max_new_tokens=12,
                              early_exit=ExitGateConfig(threshold=1.0))
    assert torch.equal(out.sequences, plain.sequences)
    assert out.stats.blocks_per_token == 3.0


def test_per_token_exit_everywhere_is_the_drafter_with_propagated_kv():
    """Every decoded token exits after block 0 (later blocks only get their KV filled), so the tokens are
    those of the model cut after block 0, fed the full model's first token (the prompt runs full depth)."""
    model, inputs = _llama(), _text(batch=3, length=10)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    out = dynasparse.generate(model, ids, mask, max_new_tokens=12,
                              early_exit=ExitGateConfig(after_blocks=(0,), threshold=0.0))
    assert out.stats.blocks_per_token == 1.0
    example = {"input_ids": ids, "attention_mask": mask, "position_ids": torch.arange(10)[None].expand(3, 10)}
    drafter = dynasparse.optimize(model, [ExitGateConfig(after_blocks=(0,), mode="draft"),
                                          dynasparse.KVEvictionConfig(policy="full")], example_kwargs=example)
    first = out.sequences[:, 10:11]
    expected = dynasparse.generate(drafter, torch.cat([ids, first], 1),
                                   torch.cat([mask, torch.ones_like(first)], 1), max_new_tokens=11)
    assert torch.equal(expected.sequences[:, 11:], out.sequences[:, 11:])


def test_per_token_exit_batched_rows_equal_rows_alone():
    model, inputs = _llama(), _text(batch=3, length=10)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    config = ExitGateConfig(threshold=0.015)  # some tokens exit after block 0 or 1, others run full depth
    out = dynasparse.generate(model, ids, mask, max_new_tokens=12, early_exit=config)
    assert 1.0 < out.stats.blocks_per_token < 3.0
    for row in range(3):
        real = mask[row].bool()
        alone = dynasparse.generate(model, ids[row:row + 1, real], max_new_tokens=12, early_exit=config)
        assert torch.equal(alone.sequences[:, -12:], out.sequences[row:row + 1, -12:])


def test_skipdecode_schedule_runs_fewer_blocks_for_later_tokens():
    model, inputs = _llama(), _text(batch=3, length=10)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    plain = dynasparse.generate(model, ids, mask, max_new_tokens=9)
    same = dynasparse.generate(model, ids, mask, max_new_tokens=9, early_exit=ExitGateConfig(decode_schedule=(3, 3)))
    assert torch.equal(same.sequences, plain.sequences)
    config = ExitGateConfig(decode_schedule=(3, 1))
    steps = dynasparse.runtime.generate.steps_for(model, [config], 3, 19, ids.device, new_tokens=9)
    out = dynasparse.generate(model, ids, mask, max_new_tokens=9, early_exit=config)
    assert out.stats.blocks_per_token == pytest.approx(sum(round(3 - 2 * t / 7) for t in range(8)) / 8)
    assert steps.decode_steps == 8 and torch.equal(out.sequences[:, :11], plain.sequences[:, :11])
    with pytest.raises(DynasparseError, match="dynasparse.generate"):
        dynasparse.optimize(model, config, example_kwargs=inputs)
