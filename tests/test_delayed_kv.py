"""dKV-Cache on a masked-diffusion LM (a BERT, and the project's bidirectional Llama with RoPE): a plain call
and a refresh every step are the model itself, a cached token whose input did not change gives what
recomputing it gives, batched == alone, and bad input is named."""
import pytest
import torch
import transformers as hf

import dynasparse
from dynasparse import DelayedKVConfig, DynasparseError
from dynasparse.harness import difflm

MASK = difflm.MASK


def _bert() -> hf.BertForMaskedLM:
    torch.manual_seed(0)
    config = hf.BertConfig(vocab_size=difflm.VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=128, pad_token_id=None,
                           attn_implementation="sdpa")
    return hf.BertForMaskedLM(config).eval()


def _llama() -> difflm.BidirectionalLM:
    torch.manual_seed(0)
    return difflm.build_model("tiny").eval()


def _optimize(model, **config):
    ids = torch.randint(0, 256, (2, 32))
    return dynasparse.optimize(model, [DelayedKVConfig(**config)],
                               example_kwargs={"input_ids": ids, "attention_mask": torch.ones_like(ids)})


@pytest.fixture(scope="module")
def model():
    return _bert()


BOTH = pytest.mark.parametrize("build", [_bert, _llama], ids=["bert", "llama-rope"])


def _prompt(batch: int = 3, length: int = 12) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(1))


@BOTH
def test_a_plain_call_is_the_model(build):
    model = build()
    optimized = _optimize(model)
    ids = torch.randint(0, 256, (3, 40))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with torch.no_grad():
        torch.testing.assert_close(optimized(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)
    assert "keys and values cached" in str(optimized.report)


@pytest.mark.parametrize("block_length", [None, 4])
def test_a_refresh_every_step_unmasks_what_the_model_does(model, block_length):
    prompt = _prompt()
    expected = dynasparse.unmask(model, prompt, new_tokens=16, steps=8, mask_id=MASK, block_length=block_length,
                                 progress=False)
    got = dynasparse.unmask(_optimize(model, refresh_every=1), prompt, new_tokens=16, steps=8, mask_id=MASK,
                            block_length=block_length, progress=False)
    assert torch.equal(got.tokens, expected.tokens)
    assert got.stats.computed_share == 1.0
    assert not (got.tokens == MASK).any()


@BOTH
def test_cached_tokens_whose_input_did_not_change_are_exact(build):
    """After a refresh, a step over some positions with nothing else changed reads cached keys and values
    that equal recomputed ones, so its logits equal the full pass's at those positions (RoPE's cos and sin
    are gathered at the active positions with the stream)."""
    optimized = _optimize(build())
    ids = torch.randint(0, 256, (2, 24))
    mask = torch.ones_like(ids)
    active = torch.tensor([[1, 5, 6, 20], [0, 2, 9, 23]])
    runner = optimized.runner
    runner.start(2, 24)
    with torch.no_grad():
        full = optimized(input_ids=ids, attention_mask=mask).logits
        runner.active = active
        part = optimized(input_ids=ids, attention_mask=mask).logits
    runner.stop()
    torch.testing.assert_close(part, full.gather(1, active[..., None].expand(-1, -1, full.shape[-1])),
                               rtol=1e-5, atol=1e-5)


class _Recording(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, input_ids, attention_mask):
        self.seen.append(input_ids.clone())
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


def test_blocks_unmask_left_to_right(model):
    """With block_length, a position of a block is decoded only once every earlier block is done."""
    recording = _Recording(model)
    out = dynasparse.unmask(recording, _prompt(), new_tokens=16, steps=16, mask_id=MASK, block_length=4,
                            progress=False)
    assert not (out.tokens == MASK).any()
    for seen in [*recording.seen, out.tokens]:
        done = (seen[:, 12:] != MASK).view(seen.shape[0], 4, 4).sum(-1)  # decoded per block of 4
        for block in range(1, 4):
            assert ((done[:, block] == 0) | (done[:, :block] == 4).all(-1)).all()


def test_caching_computes_less_and_batched_equals_alone(model):
    optimized = _optimize(model, refresh_every=4, delay=1)
    prompt = _prompt()
    batched = dynasparse.unmask(optimized, prompt, new_tokens=16, steps=16, mask_id=MASK, progress=False)
    assert batched.stats.computed_share < 0.6
    assert batched.stats.active[:3] == [28, 16, 15]  # a refresh, then the masked tokens and the last decoded
    for row in range(prompt.shape[0]):
        alone = dynasparse.unmask(optimized, prompt[row:row + 1], new_tokens=16, steps=16, mask_id=MASK,
                                  progress=False)
        assert torch.equal(alone.tokens[0], batched.tokens[row])


def test_opcheck():
    hidden, index = torch.randn(2, 6, 8), torch.tensor([[0, 3], [5, 1]])
    torch.library.opcheck(torch.ops.dynasparse.gather_active.default, (hidden, index))
    q, k, v = torch.randn(2, 4, 2, 8), torch.randn(2, 2, 2, 8), torch.randn(2, 2, 2, 8)
    caches = torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    torch.library.opcheck(torch.ops.dynasparse.cached_attention.default,
                          (q, k, v, torch.rand(2, 1, 6, 6) > 0.2, *caches, index, 0.5))


def test_config_round_trips_through_json():
    config = DelayedKVConfig(refresh_every=4, delay=2)
    assert dynasparse.BaseConfig.from_json(config.to_json()) == config


def test_bad_input_is_named(model):
    for bad, words in [({"refresh_every": 0}, "refresh_every"), ({"delay": -1}, "delay"),
                       ({"layers": (0,)}, "layers")]:
        with pytest.raises(DynasparseError, match=words):
            DelayedKVConfig(**bad)
    llama = hf.LlamaForCausalLM(hf.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, intermediate_size=64)).eval()
    ids = torch.randint(0, 64, (1, 8))
    with pytest.raises(DynasparseError, match="causal"):
        dynasparse.optimize(llama, [DelayedKVConfig()], example_inputs=(ids,))
    with pytest.raises(DynasparseError, match="does not compose"):
        dynasparse.optimize(model, [DelayedKVConfig(), dynasparse.TokenMergeConfig(keep_ratio=0.5)],
                            example_kwargs={"input_ids": ids})
    prompt = _prompt()
    with pytest.raises(DynasparseError, match="mask token"):
        dynasparse.unmask(model, prompt.clamp(max=0) + MASK, new_tokens=4, steps=2, mask_id=MASK)
    with pytest.raises(DynasparseError, match="steps"):
        dynasparse.unmask(model, prompt, new_tokens=4, steps=8, mask_id=MASK)
    with pytest.raises(DynasparseError, match="block_length"):
        dynasparse.unmask(model, prompt, new_tokens=16, steps=8, mask_id=MASK, block_length=5)


def test_export_refuses(model, tmp_path):
    optimized = _optimize(model)
    with pytest.raises(DynasparseError, match="ONNX"):
        dynasparse.export_onnx(optimized, tmp_path / "m.onnx")


def test_the_diffusion_lm_trains(tmp_path):
    first = difflm.load_or_train("tiny", cache_dir=tmp_path, log=lambda _: None)
    again = difflm.load_or_train("tiny", cache_dir=tmp_path, log=lambda _: None)
    for a, b in zip(first.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
