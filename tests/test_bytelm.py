"""Byte LM: offline corpus splits, byte round-trip, tiny training, the weight cache, perplexity."""
import math

import pytest
import torch

from dynasparse.harness import bytelm


def test_corpus_splits_are_nonempty_and_disjoint():
    names = {split: {name for name, _ in docs} for split, docs in bytelm._documents().items()}
    assert names["train"] and names["heldout"]
    assert not names["train"] & names["heldout"]
    assert any(name.startswith("pydoc:") for name in names["train"])
    train, heldout = bytelm.corpus("train"), bytelm.corpus("heldout")
    assert 100_000 < len(heldout) < len(train) / 5
    assert bytelm.corpus("train") is train  # cached
    with pytest.raises(ValueError):
        bytelm.corpus("test")


def test_encode_decode_round_trip():
    text = "def f(x):\n    return x  # héllo, 世界\n"
    ids = bytelm.encode(text)
    assert ids.dtype == torch.long and ids.shape == (len(text.encode()),) and int(ids.max()) < bytelm.VOCAB
    assert bytelm.decode(ids) == text
    assert torch.equal(bytelm.encode(text.encode()), ids)
    assert bytelm.decode([0xFF, ord("a")]) == "\ufffda"
    assert bytelm.encode("").numel() == 0
    assert torch.equal(bytelm.heldout_tokens(64), bytelm.encode(bytelm.corpus("heldout")[:64]))


def test_build_model_config():
    config = bytelm.build_model("small").config
    assert config.vocab_size == 256 and config.max_position_embeddings == 8192
    assert config.num_key_value_heads < config.num_attention_heads
    assert config.tie_word_embeddings and config._attn_implementation == "sdpa"


def test_tiny_model_trains_caches_and_reloads(tmp_path, monkeypatch):
    tokens = bytelm.heldout_tokens(64 * 32)
    untrained = bytelm.perplexity(bytelm.build_model("tiny").eval(), tokens, context=64)
    lines = []
    model = bytelm.load_or_train("tiny", cache_dir=tmp_path, log=lines.append)
    assert not model.training and any("bits/byte" in line for line in lines)
    trained = bytelm.perplexity(model, tokens, context=64)
    assert trained["ppl"] < untrained["ppl"] / 4
    assert bytelm.cache_path("tiny", tmp_path).exists()

    def no_training(*args, **kwargs):
        raise AssertionError("should have loaded the cache")

    monkeypatch.setattr(bytelm, "train", no_training)
    reloaded = bytelm.load_or_train("tiny", cache_dir=tmp_path)
    assert not reloaded.training
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens[None, :128]).logits, reloaded(input_ids=tokens[None, :128]).logits)
    with pytest.raises(AssertionError, match="should have loaded"):
        bytelm.load_or_train("tiny", cache_dir=tmp_path, force=True)


def test_perplexity_windows_and_forward_callable():
    model = bytelm.build_model("tiny").eval()
    tokens = bytelm.heldout_tokens(1000)
    result = bytelm.perplexity(model, tokens, context=100)
    assert result["tokens"] == 10 * 99
    assert math.isfinite(result["ppl"]) and result["ppl"] > 1
    assert result["bits_per_byte"] == pytest.approx(math.log2(result["ppl"]))
    # Overlapping windows score every token after the first exactly once.
    assert bytelm.perplexity(model, tokens, context=100, stride=50)["tokens"] == 999

    calls = []

    def uniform(input_ids):
        calls.append(input_ids.shape)
        return torch.zeros(*input_ids.shape, bytelm.VOCAB)

    result = bytelm.perplexity(model, tokens, context=100, forward=uniform, batch_size=4)
    assert calls == [(4, 100), (4, 100), (2, 100)]
    assert result["ppl"] == pytest.approx(256) and result["bits_per_byte"] == pytest.approx(8)
