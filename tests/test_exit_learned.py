"""Learned exit gates (JEI-DNN): trained by dynasparse.fit on a frozen model; unfitted, they never exit."""
import shutil

import pytest
import torch

import dynasparse
from dynasparse import DynasparseError, ExitGateConfig
from dynasparse.ir.ops import LEARNED_EXIT
from dynasparse.kernels.exit_gate import LEARNED_FEATURES, learned_features

from default_configs import EXIT_GATES, VOCAB, bert, decoder_prompts, encoder_inputs, llama


def _batches(count: int = 8, seed: int = 3) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (6, 24), generator=generator),
             "attention_mask": torch.ones(6, 24, dtype=torch.long)} for _ in range(count)]


def _classifier(config: ExitGateConfig):
    return dynasparse.optimize(bert(), config, example_kwargs=encoder_inputs())


def test_learned_exit_opcheck_and_first_gate_features():
    logits, previous = torch.randn(3, 7, 11), torch.randn(3, 7, 11)
    torch.library.opcheck(LEARNED_EXIT, (logits, previous, torch.randn(len(LEARNED_FEATURES)), torch.tensor(0.2)))
    own = learned_features(logits, logits)  # the first gate compares an exit with itself
    torch.testing.assert_close(own[..., LEARNED_FEATURES.index("prob_of_previous")], own[..., 0])
    assert bool((own[..., LEARNED_FEATURES.index("agrees_with_previous")] == 1).all())


def test_unfitted_gates_never_exit():
    model, inputs = bert(), encoder_inputs()
    optimized = _classifier(ExitGateConfig(criterion="learned"))
    with torch.no_grad():
        torch.testing.assert_close(optimized(**inputs).logits, model(**inputs).logits, atol=1e-5, rtol=1e-5)
    assert bool((optimized.runner.last_exit_blocks == 3).all())


def test_fit_trains_the_gates_only_and_meets_the_quality_target(tmp_path):
    model = bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimized = dynasparse.optimize(model, ExitGateConfig(criterion="learned", max_quality_drop=0.1),
                                    example_kwargs=encoder_inputs())
    report = dynasparse.fit(optimized, _batches(), held_out=0.25, save=tmp_path / "gates.safetensors")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert report.exits["quality_drop"] <= 0.1 and report.exits["exit_share"] > 0
    assert set(report.exits["gate_accuracy"]) == {"exit_0_gate", "exit_1_gate", "exit_2_gate"}
    # the file carries the gates and the threshold fit chose: a new capture exits the same rows
    loaded = _classifier(ExitGateConfig(criterion="learned", fitted=str(tmp_path / "gates.safetensors")))
    inputs = _batches(1, seed=9)[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, optimized(**inputs).logits)
    assert torch.equal(loaded.runner.last_exit_blocks, optimized.runner.last_exit_blocks)


def test_fit_on_token_ids_is_deterministic():
    def fitted():
        optimized = dynasparse.optimize(llama(), ExitGateConfig(criterion="learned"),
                                        example_kwargs={"input_ids": torch.randint(1, VOCAB, (2, 16))})
        ids = torch.randint(1, VOCAB, (10, 16), generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():  # as benchmarks call it
            dynasparse.fit(optimized, ids)
        return optimized.graph_module.exit_0_gate_weight.clone()
    assert torch.equal(fitted(), fitted())


def test_generate_with_learned_per_token_exits_batched_equals_alone():
    model, (ids, mask) = llama(), decoder_prompts()
    kwargs = dict(max_new_tokens=6, early_exit=ExitGateConfig(criterion="learned", fitted=EXIT_GATES))
    batched = dynasparse.generate(model, ids, mask, **kwargs)
    assert batched.stats.blocks_per_token < 3  # some tokens exit
    for row in range(ids.shape[0]):
        alone = dynasparse.generate(model, ids[row:row + 1, mask[row].bool()], **kwargs).sequences
        assert torch.equal(batched.sequences[row, -6:], alone[0, -6:])


def test_loading_into_another_model_names_the_mismatch(tmp_path):
    path = tmp_path / "gates.safetensors"
    shutil.copy(EXIT_GATES, path)
    shutil.copy(EXIT_GATES + ".json", str(path) + ".json")
    with pytest.raises(DynasparseError, match="fitted on another model or config.*exit_0_gate"):
        dynasparse.optimize(llama(layers=3), ExitGateConfig(criterion="learned", after_blocks=(1,), fitted=str(path)),
                            example_kwargs={"input_ids": torch.randint(1, VOCAB, (2, 16))})


@pytest.mark.parametrize("call, message", [
    (lambda: ExitGateConfig(fitted=EXIT_GATES), "give criterion='learned'"),
    (lambda: ExitGateConfig(criterion="learned", fitted="nowhere.safetensors"), "is not a file"),
    (lambda: dynasparse.fit(_classifier(ExitGateConfig()), _batches()), "no trainable gates"),
    (lambda: dynasparse.fit(_classifier(ExitGateConfig(criterion="learned")), _batches(1)), "held-out batches"),
    (lambda: dynasparse.fit(_classifier(ExitGateConfig(criterion="learned")), [{"pixel_values": torch.ones(1)}] * 3),
     "does not fit the model"),
])
def test_bad_input_fails_clearly(call, message):
    with pytest.raises(DynasparseError, match=message):
        call()
