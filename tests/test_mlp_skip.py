"""MLP skipping behind learned routers, and dynasparse.fit that trains them on a frozen model."""
import json
import shutil

import pytest
import torch
import transformers as hf

import dynasparse
from dynasparse import DynasparseError, MLPSkipConfig
from dynasparse.ir.ops import TOKEN_ROUTE
from dynasparse.kernels.mlp_skip import adapter, routed
from dynasparse.passes.mlp_skip import routed_mlps

from conftest import left_padded_prompts
from default_configs import MLP_GATES as FITTED, VOCAB, decoder_prompts, llama


def _gpt2() -> hf.GPT2LMHeadModel:
    torch.manual_seed(0)
    return hf.GPT2LMHeadModel(hf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB)).eval()


def _ids(rows: int = 12, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def _optimized(model, config=None):
    return dynasparse.optimize(model, config or MLPSkipConfig(), example_kwargs={"input_ids": _ids(2)})


@pytest.mark.parametrize("build", [llama, _gpt2], ids=["llama", "gpt2"])
def test_unfitted_routers_keep_every_token(build):
    model = build()
    optimized = _optimized(model)
    assert len(routed_mlps(optimized.graph_module)) == len(optimized.report.analysis.blocks)
    ids = _ids(3)
    with torch.no_grad():
        torch.testing.assert_close(optimized(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)


def test_token_route_opcheck():
    x = torch.randn(2, 5, 8)
    torch.library.opcheck(TOKEN_ROUTE, (x, torch.randn(8), torch.tensor(0.1)))
    assert TOKEN_ROUTE(x, torch.zeros(8), torch.tensor(-1.0)).sum() == 0


def test_gathered_mlp_equals_the_masked_one():
    """Eagerly the MLP reads the kept tokens only; traced, every token with a select: the same values."""
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    x, keep = torch.randn(3, 7, 8), torch.rand(3, 7) > 0.4
    down, up = torch.randn(8, 2), torch.randn(2, 8)
    torch.testing.assert_close(routed(mlp, x, keep, down, up), torch.where(keep[..., None], mlp(x), adapter(x, down, up)))
    torch.testing.assert_close(routed(mlp, x, torch.zeros_like(keep), down, up), adapter(x, down, up))


def test_attention_op_backward_is_sdpa_backward():
    q, k, v = (torch.randn(2, 4, 6, 8, requires_grad=True) for _ in range(3))
    torch.ops.dynasparse.attention(q, k, v, None, True, None).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).sum().backward()
    for got, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(got, t.grad)


def test_fit_trains_the_routers_only_and_reaches_the_target(tmp_path):
    model = llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    optimized = _optimized(model, MLPSkipConfig(target_skip=0.5))
    report = dynasparse.fit(optimized, _ids(), steps=40, save=tmp_path / "gates.safetensors", progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # bit for bit
    assert flags == {k: p.requires_grad for k, p in model.named_parameters()}
    assert 0.3 <= report.skipped_total <= 0.8 and report.held_out_kl < 0.1
    assert report.loss[-1] < report.loss[0]
    layout = json.loads((tmp_path / "gates.safetensors.json").read_text())
    assert layout["config"]["target_skip"] == 0.5 and set(layout["modules"]) == set(report.skipped)


def test_fit_is_deterministic_under_a_seed():
    fitted = []
    for _ in range(2):
        optimized = _optimized(llama(), MLPSkipConfig(target_skip=0.5))
        dynasparse.fit(optimized, _ids(), steps=5, seed=3, progress=False)
        fitted.append([p.clone() for g in routed_mlps(optimized.graph_module).values()
                       for p in g.fitted_parameters().values()])
    assert all(torch.equal(a, b) for a, b in zip(*fitted))


def test_fitted_gates_load_by_config_and_skip():
    model = llama()
    ids = _ids(3)
    optimized = _optimized(model, MLPSkipConfig(target_skip=0.5, fitted=FITTED))
    with torch.no_grad():
        out = optimized(input_ids=ids).logits
    assert not torch.equal(out, model(input_ids=ids).logits)
    config = MLPSkipConfig(target_skip=0.5, fitted=FITTED)
    assert MLPSkipConfig.from_dict(json.loads(config.to_json())) == config


def test_generate_with_fitted_routers_batched_equals_alone():
    model, (ids, mask) = llama(), decoder_prompts()
    kwargs = dict(max_new_tokens=8, configs=[MLPSkipConfig(target_skip=0.5, fitted=FITTED)])
    batched = dynasparse.generate(model, ids, mask, **kwargs).sequences
    for row in range(ids.shape[0]):
        alone = dynasparse.generate(model, ids[row:row + 1, mask[row].bool()], **kwargs).sequences
        assert torch.equal(batched[row, -8:], alone[0, -8:])


def test_loading_into_another_model_names_the_mismatch(tmp_path):
    path = tmp_path / "gates.safetensors"
    shutil.copy(FITTED, path)
    shutil.copy(FITTED + ".json", str(path) + ".json")
    with pytest.raises(Exception, match="fitted on another model or config.*mlp_skip_2"):
        _optimized(llama(layers=3), MLPSkipConfig(fitted=str(path)))
    with pytest.raises(Exception, match="gates of other shapes"):
        _optimized(llama(), MLPSkipConfig(adapter_rank=4, fitted=str(path)))


@pytest.mark.parametrize("call, message", [
    (lambda: MLPSkipConfig(target_skip=1.0), r"target_skip=1.0 is out of range"),
    (lambda: MLPSkipConfig(target_skip=0.0), r"target_skip=0.0 is out of range"),
    (lambda: MLPSkipConfig(fitted="nowhere.safetensors"), "is not a file"),
    (lambda: dynasparse.fit(dynasparse.optimize(llama(), example_kwargs={"input_ids": _ids(2)}), _ids()),
     "no trainable gates"),
    (lambda: dynasparse.fit(llama(), _ids()), "optimize"),
    (lambda: dynasparse.fit(_optimized(llama()), _ids(rows=4)), "at least batch_size"),
    (lambda: dynasparse.fit(_optimized(llama()), _ids().float()), "token ids"),
])
def test_bad_input_fails_clearly(call, message):
    with pytest.raises(DynasparseError, match=message):
        call()


@pytest.mark.slow
def test_compiled_decode_steps_take_the_same_decisions():
    """Compiled, every token runs the MLP and a select keeps the routed value: the eager tokens. Over a bounded
    cache, one prefill-chunk graph (any chunk length) and one decode-step graph serve a later generation with
    other lengths (this is also the KV cache's compiled run)."""
    from torch._dynamo.utils import counters

    model = llama()
    kv = dynasparse.KVEvictionConfig(policy="h2o", budget=12, sink=2, recent=4, chunk_size=5)
    torch._dynamo.reset()
    counters.clear()
    for length, new_tokens in [(14, 6), (19, 9)]:
        ids, mask = left_padded_prompts(VOCAB, 3, length)
        kwargs = dict(max_new_tokens=new_tokens, configs=[MLPSkipConfig(target_skip=0.5, fitted=FITTED)], kv=kv)
        eager = dynasparse.generate(model, ids, mask, **kwargs).sequences
        assert torch.equal(dynasparse.generate(model, ids, mask, compile=True, **kwargs).sequences, eager)
        assert counters["stats"]["unique_graphs"] == 2
