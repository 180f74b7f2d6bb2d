"""KV eviction pass and generate runtime: full budget == Hugging Face, batched == alone, bounded memory,
ONNX Runtime == PyTorch, clear errors."""
import pytest
import torch
import transformers as hf

import dynasparse
from dynasparse.errors import DynasparseError
from dynasparse.ir.ops import KV_CACHE_ATTENTION
from dynasparse.kernels.kv_cache import empty_state, kv_cache_step_reference
from dynasparse.kernels.policies import POLICIES
from dynasparse.runtime.generate import decoder_for

from conftest import left_padded_prompts, load

VOCAB = 512
POLICY_NAMES = sorted(POLICIES)


def _lm(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  vocab_size=VOCAB)
    model = {
        "llama": lambda: hf.LlamaForCausalLM(hf.LlamaConfig(**common, num_key_value_heads=2)),
        "qwen2": lambda: hf.Qwen2ForCausalLM(hf.Qwen2Config(**common, num_key_value_heads=2)),
        "mistral": lambda: hf.MistralForCausalLM(hf.MistralConfig(**common, num_key_value_heads=1)),
        "gpt2": lambda: hf.GPT2LMHeadModel(hf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB,
                                                         bos_token_id=0, eos_token_id=0)),
    }[name]()
    return model.eval()


_models: dict[str, torch.nn.Module] = {}


def lm(name: str) -> torch.nn.Module:
    if name not in _models:
        _models[name] = _lm(name)
    return _models[name]


def prompts(batch: int = 3, length: int = 14, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return left_padded_prompts(VOCAB, batch, length, seed)


def kv(policy="h2o", budget=16, **kwargs) -> dynasparse.KVEvictionConfig:
    kwargs.setdefault("sink", 2)
    kwargs.setdefault("recent", 4)
    kwargs.setdefault("chunk_size", 5)
    return dynasparse.KVEvictionConfig(policy=policy, budget=budget, **kwargs)


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "gpt2"])
def test_full_cache_greedy_equals_hugging_face_generate(name):
    model = lm(name)
    ids, mask = prompts()
    ours = dynasparse.generate(model, ids, mask, max_new_tokens=24)
    theirs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                            pad_token_id=0)
    assert torch.equal(ours.sequences, theirs)


_full_tokens: list[torch.Tensor] = []


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_budget_of_the_whole_sequence_is_the_full_cache(policy):
    """``budget=1.0``: a share that holds every token. (A roomy budget in tokens is each policy's zero
    entry in test_techniques.py.)"""
    model = lm("llama")
    ids, mask = prompts()
    if not _full_tokens:
        _full_tokens.append(dynasparse.generate(model, ids, mask, max_new_tokens=20).sequences)
    ratio = dynasparse.generate(model, ids, mask, max_new_tokens=20, kv=kv(policy, budget=1.0)).sequences
    assert torch.equal(_full_tokens[0], ratio)


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_batched_rows_equal_rows_alone_evicting_every_chunk(policy):
    """Eviction after the prompt is each policy's entry in test_techniques.py; here every chunk evicts."""
    model = lm("llama")
    ids, mask = prompts(batch=3, length=20)
    config = kv(policy, budget=12, compress="every_chunk")
    batched = dynasparse.generate(model, ids, mask, max_new_tokens=24, kv=config).sequences
    for row in range(ids.shape[0]):
        start = int((mask[row] == 0).sum())
        alone = dynasparse.generate(model, ids[row:row + 1, start:], max_new_tokens=24, kv=config).sequences
        assert torch.equal(alone[0, -24:], batched[row, -24:]), f"row {row}"


def test_eviction_changes_the_output_and_keeps_the_cache_bounded():
    model = lm("llama")
    ids, mask = prompts(batch=2, length=20)
    full = dynasparse.generate(model, ids, mask, max_new_tokens=30)
    bounded = dynasparse.generate(model, ids, mask, max_new_tokens=30, kv=kv("streaming", budget=10))
    assert not torch.equal(full.sequences, bounded.sequences)
    assert bounded.stats.cache_capacity == [10, 10]
    assert bounded.stats.cache_allocated_bytes * 4 < full.stats.cache_allocated_bytes


@pytest.mark.parametrize("policy", ["h2o", "tova", "streaming"])
def test_compressing_after_prefill_evicts_as_one_chunk_holding_the_whole_prompt(policy):
    """Chunk by chunk into a cache that holds the prompt, then one eviction: the scores have read every
    prompt token, as when the whole prompt is one chunk. Prefill holds the prompt; decode the budget."""
    model = lm("llama")
    ids, mask = prompts(batch=3, length=20)
    once = dynasparse.generate(model, ids, mask, max_new_tokens=16, kv=kv(policy, budget=10))
    one_chunk = dynasparse.generate(model, ids, mask, max_new_tokens=16,
                                    kv=kv(policy, budget=10, chunk_size=64, compress="every_chunk"))
    assert torch.equal(once.sequences, one_chunk.sequences)
    # 20 prompt slots vs 10, each + the scratch slot; ``seen`` is the same
    seen = len(once.stats.cache_capacity) * ids.shape[0] * 8  # one int64 per row and layer
    assert (once.stats.cache_prefill_bytes - seen) * 11 == (once.stats.cache_allocated_bytes - seen) * 21
    assert once.stats.cache_allocated_bytes == one_chunk.stats.cache_allocated_bytes


def test_long_generation_keeps_cache_bytes_constant_once_full():
    model = lm("llama")  # RoPE: no learned position table to run out of
    ids = torch.randint(1, VOCAB, (1, 64))
    config = dynasparse.KVEvictionConfig(policy="h2o", budget=128, sink=4, recent=32)
    out = dynasparse.generate(model, ids, max_new_tokens=2048, kv=config, progress=False)
    used = out.stats.cache_used_bytes
    assert out.sequences.shape == (1, 64 + 2048)
    first_full = used.index(max(used))
    assert first_full == 128 - 64  # full once 128 tokens are in
    assert len(set(used[first_full:])) == 1 and used[-1] < out.stats.cache_allocated_bytes  # + scratch slots


def test_every_site_gets_a_cache_node_and_the_report_says_so():
    decoder = decoder_for(lm("llama"), kv("tova", layers=(1,)))
    nodes = [n for n in decoder.graph_module.graph.nodes if n.target is KV_CACHE_ATTENTION]
    assert [n.args[11] for n in nodes] == ["full", "tova"]
    text = str(decoder.report)
    assert "layer 0: full cache" in text and "layer 1: tova cache" in text


def test_sinks_and_recent_window_are_never_evicted():
    torch.manual_seed(0)
    state = empty_state(1, 2, 12, 8, 8, torch.float32)
    for step in range(40):
        length = 5 if step == 0 else 1
        q, k, v = torch.randn(1, 4, length, 8), torch.randn(1, 2, length, 8), torch.randn(1, 2, length, 8)
        kv_cache_step_reference(q, k, v, None, True, None, *state.values(), "h2o", 3, 4, 32, 5)
    held = state["positions"][..., :-1]
    seen = int(state["seen"])
    for head in range(2):
        kept = set(held[0, head].tolist())
        assert {0, 1, 2} <= kept and set(range(seen - 4, seen)) <= kept and -1 not in kept


def test_h2o_mean_holds_the_h2o_mass_per_query_that_saw_each_token():
    torch.manual_seed(0)
    states = {policy: empty_state(2, 2, 64, 8, 8, torch.float32) for policy in ("h2o", "h2o_mean")}
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool).tril()
    mask[1, ..., :2] = False  # row 1's first two tokens are padding
    for step in range(10):  # a left-padded chunk, then decode steps
        length = 6 if step == 0 else 1
        q, k, v = torch.randn(2, 4, length, 8), torch.randn(2, 2, length, 8), torch.randn(2, 2, length, 8)
        for policy, state in states.items():
            kv_cache_step_reference(q, k, v, mask if step == 0 else None, step == 0, None, *state.values(), policy,
                                    4, 4, 32, 5)
    positions, seen = states["h2o"]["positions"], states["h2o"]["seen"]
    observers = (seen[:, None, None] - positions).clamp(min=1).float()
    held = positions >= 0
    torch.testing.assert_close((states["h2o_mean"]["scores"] * observers)[held], states["h2o"]["scores"][held])



def test_expected_attention_from_one_query_is_its_attention_times_the_value_norms():
    """With one observed query the fitted Gaussian has no spread: the expected attention is that query's
    softmax (TOVA's mass, summed over the group's 2 query heads there, averaged here) times ||v||."""
    torch.manual_seed(0)
    states = {policy: empty_state(2, 2, 64, 8, 8, torch.float32) for policy in ("tova", "expected_attention")}
    for step in range(2):  # a prompt chunk, then one decode step: every slot rescored by the one query
        length = 6 if step == 0 else 1
        q, k, v = torch.randn(2, 4, length, 8), torch.randn(2, 2, length, 8), torch.randn(2, 2, length, 8)
        for policy, state in states.items():
            kv_cache_step_reference(q, k, v, None, True, None, *state.values(), policy, 4, 4, 32, 5)
    tova, expected = states["tova"], states["expected_attention"]
    held = tova["positions"] >= 0
    torch.testing.assert_close(expected["scores"][held], (tova["scores"] / 2 * tova["values"].norm(dim=-1))[held])

def test_sampling_is_reproducible_and_stops_at_eos():
    model = lm("llama")
    ids, mask = prompts(batch=2)
    runs = [dynasparse.generate(model, ids, mask, max_new_tokens=12, temperature=0.8, top_p=0.9,
                                generator=torch.Generator().manual_seed(3)).sequences for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    greedy = dynasparse.generate(model, ids, mask, max_new_tokens=12).sequences
    eos = int(greedy[0, ids.shape[1] + 2])
    streamed = []
    stopped = dynasparse.generate(model, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=7,
                                  stream=streamed.append)
    row = stopped.sequences[0, ids.shape[1]:]
    assert int(row[2]) == eos and (row[3:] == 7).all()
    assert len(streamed) == stopped.stats.new_tokens


@pytest.mark.slow
def test_onnx_runtime_reproduces_greedy_tokens(tmp_path):
    """On Qwen2 (biased q/k/v projections); every policy's parity on Llama: test_techniques.py."""
    model = lm("qwen2")
    config = kv("h2o", budget=14)
    path = dynasparse.export_onnx(decoder_for(model, config), tmp_path / "decoder.onnx")
    session = dynasparse.ort_session(path)
    ids, mask = prompts()
    ours = dynasparse.generate(model, ids, mask, max_new_tokens=24, kv=config).sequences
    ort = dynasparse.generate(session, ids, mask, max_new_tokens=24).sequences
    assert torch.equal(ours, ort)


def test_pyramid_budgets_spread_the_same_total():
    config = dynasparse.KVEvictionConfig(policy="h2o", budget=100, schedule="pyramid", sink=4, recent=8)
    capacities = config.capacities(4, 1000)
    assert capacities[0] > capacities[-1] and sorted(capacities, reverse=True) == capacities
    assert abs(sum(capacities) - 400) <= 4
    assert dynasparse.KVEvictionConfig(budget=0.25).capacities(2, 1000) == [250, 250]


@pytest.mark.parametrize("kwargs, message", [
    (dict(compress="never"), "compress='never'"),
    (dict(budget=20, sink=4, recent=32), "below sink \\+ recent"),
    (dict(policy="lru"), "not a known policy"),
    (dict(budget=1.5), "share of the sequence"),
    (dict(schedule="pyramid", budget=(40, 40)), "pyramid"),
])
def test_bad_settings_fail_clearly(kwargs, message):
    with pytest.raises(DynasparseError, match=message):
        dynasparse.KVEvictionConfig(**kwargs)


def test_ratio_budget_too_small_for_sink_and_recent_fails_at_generate():
    ids, mask = prompts()
    with pytest.raises(DynasparseError, match="below sink \\+ recent"):
        dynasparse.generate(lm("llama"), ids, mask, max_new_tokens=200, kv=kv(budget=0.01, recent=8))


def test_non_causal_model_is_refused():
    entry = load("bert-tiny")
    with pytest.raises(DynasparseError, match="causal decoder"):
        dynasparse.optimize(entry.model, dynasparse.KVEvictionConfig(), example_kwargs=entry.make_inputs(2, 16))


def test_optimized_model_refuses_another_config():
    decoder = decoder_for(lm("llama"), kv("h2o"))
    ids, mask = prompts()
    with pytest.raises(DynasparseError, match="optimized with"):
        dynasparse.generate(decoder, ids, mask, max_new_tokens=2, kv=kv("tova"))
