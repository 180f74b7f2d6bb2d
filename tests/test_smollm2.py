"""The real SmolLM2-135M-Instruct end to end: exact logits, Hugging Face's greedy tokens (alone and in a
left-padded batch of chat prompts), the CLI, and the exported decode step in ONNX Runtime.

The model is loaded once per test session (the first load ever de-quantizes the GGUF file, about 30 s).
"""
import copy

import pytest
import torch

import dynasparse
from dynasparse import KVEvictionConfig
from dynasparse.cli import main
from dynasparse.harness import zoo
from dynasparse.runtime.steps import decoder_for

pytestmark = pytest.mark.slow

QUESTIONS = ["What is a tuple?", "Name three Python keywords and say what each one does.",
             "Why is the sky blue?", "Write a haiku about a compiler that removes dead code."]


@pytest.fixture(scope="session")
def smollm2() -> zoo.ZooModel:
    return zoo.load("smollm2")


def _chat(tokenizer, questions: list[str]) -> dict[str, torch.Tensor]:
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                           tokenize=False) for q in questions]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _hf_greedy(model, inputs: dict[str, torch.Tensor], new_tokens: int, **kwargs) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, **kwargs)


def test_optimize_reproduces_the_logits(smollm2):
    ids = smollm2.tokenizer(" ".join(zoo.paragraphs())[:2000], return_tensors="pt").input_ids[:, :96]
    inputs = {"input_ids": ids.repeat(2, 1), "attention_mask": torch.ones(2, 96, dtype=torch.long)}
    inputs["attention_mask"][1, :20] = 0
    optimized = dynasparse.optimize(smollm2.model, [], example_kwargs=inputs)
    with torch.no_grad():
        expected, actual = smollm2.model(**inputs).logits, optimized(**inputs).logits
    assert (expected - actual).abs().max() <= 1e-4


def test_full_cache_generates_hugging_face_greedy_tokens(smollm2):
    inputs = _chat(smollm2.tokenizer, ["Explain what a Python list comprehension is, with an example."])
    expected = _hf_greedy(smollm2.model, inputs, 40, min_new_tokens=40)
    ours = dynasparse.generate(smollm2.model, inputs["input_ids"], inputs["attention_mask"], max_new_tokens=40)
    assert torch.equal(ours.sequences, expected)


def test_kvzip_head_groups_holding_every_token_generate_hugging_face_greedy_tokens(smollm2, tmp_path):
    """Retrieval heads under KVzip (its re-read included) and streaming heads whose window covers the
    sequence: the cache holds every token, so the tokens are Hugging Face's."""
    config = smollm2.model.config
    scores = dynasparse.HeadScores("smollm2", [[float(h == layer % 3) for h in range(config.num_key_value_heads)]
                                               for layer in range(config.num_hidden_layers)], 1, 256)
    inputs = _chat(smollm2.tokenizer, QUESTIONS[:1])
    expected = _hf_greedy(smollm2.model, inputs, 32, min_new_tokens=32)
    kv = dynasparse.KVEvictionConfig(policy="kvzip", budget=600, recent=512, chunk_size=16,
                                     head_scores=str(scores.save(tmp_path / "heads.json")), retrieval_heads=0.3)
    ours = dynasparse.generate(smollm2.model, inputs["input_ids"], inputs["attention_mask"], max_new_tokens=32, kv=kv)
    assert torch.equal(ours.sequences, expected)


def test_left_padded_chat_batch_generates_hugging_face_greedy_tokens(smollm2):
    inputs = _chat(smollm2.tokenizer, QUESTIONS)
    assert len(set(inputs["attention_mask"].sum(-1).tolist())) == len(QUESTIONS)  # four prompt lengths
    eos = smollm2.tokenizer.eos_token_id
    expected = _hf_greedy(smollm2.model, inputs, 32, eos_token_id=eos, pad_token_id=eos)
    ours = dynasparse.generate(smollm2.model, inputs["input_ids"], inputs["attention_mask"], max_new_tokens=32,
                               eos_token_id=eos, pad_token_id=eos)
    width = expected.shape[1]  # Hugging Face stops when every row has ended; so does generate
    assert torch.equal(ours.sequences[:, :width], expected)


def test_cli_streams_the_answer_and_reports_the_cache(smollm2, monkeypatch, capsys):
    monkeypatch.setattr(zoo, "load", lambda name, dtype=torch.float32: smollm2)
    assert main(["generate", "smollm2", "--chat", "--prompt", "What is a tuple?", "--max-new-tokens", "12",
                 "--kv", "h2o:40"]) == 0
    captured = capsys.readouterr()
    inputs = _chat(smollm2.tokenizer, ["What is a tuple?"])
    expected = dynasparse.generate(smollm2.model, inputs["input_ids"], max_new_tokens=12,
                                   kv=KVEvictionConfig(policy="h2o", budget=40),
                                   eos_token_id=smollm2.tokenizer.eos_token_id).sequences
    answer = smollm2.tokenizer.decode(expected[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert captured.out.strip() == answer.strip()
    assert "decode tokens/s" in captured.err and "KV cache MiB" in captured.err and "full cache MiB" in captured.err


def test_onnx_decode_step_generates_the_torch_tokens(smollm2, tmp_path):
    """SmolLM2's weights, tokenizer and grouped heads, cut to its first 2 of 30 blocks: exporting all 30
    takes about 4 minutes on 2 cores (each block adds the same graph), which `make test` cannot afford."""
    model = copy.deepcopy(smollm2.model)
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    config = KVEvictionConfig(policy="h2o", budget=40, sink=4, recent=8, chunk_size=16)
    inputs = _chat(smollm2.tokenizer, QUESTIONS[:2])
    path = dynasparse.export_onnx(decoder_for(model, config), tmp_path / "smollm2.onnx")
    session = dynasparse.ort_session(path)
    torch_tokens = dynasparse.generate(model, **inputs, max_new_tokens=16, kv=config).sequences
    ort_tokens = dynasparse.generate(session, **inputs, max_new_tokens=16).sequences
    assert inputs["input_ids"].shape[1] + 16 > 40  # the cache evicted
    assert torch.equal(ort_tokens, torch_tokens)
