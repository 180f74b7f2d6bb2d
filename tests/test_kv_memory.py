"""A cache bounded in bytes: KVzip's re-read scores, retrieval-head groups, byte budgets."""
from __future__ import annotations

import pytest
import torch
import transformers as hf

import dynasparse
from dynasparse.errors import DynasparseError
from dynasparse.passes.retrieval_heads import HeadScores, calibrate_retrieval_heads
from dynasparse.runtime.generate import decoder_for
from dynasparse.runtime.kv_cache import site_sizes

from conftest import left_padded_prompts

VOCAB = 512


def llama(vocab: int = VOCAB) -> torch.nn.Module:
    torch.manual_seed(0)
    config = hf.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=128, vocab_size=vocab)
    return hf.LlamaForCausalLM(config).eval()


def prompts(batch: int = 3, length: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    return left_padded_prompts(VOCAB, batch, length)


def kv(policy: str = "kvzip", budget: int | float = 12, **kwargs) -> dynasparse.KVEvictionConfig:
    kwargs = {"sink": 2, "recent": 4, "chunk_size": 8, **kwargs}
    return dynasparse.KVEvictionConfig(policy=policy, budget=budget, **kwargs)


@pytest.fixture
def head_scores(tmp_path) -> str:
    """Layer 0: KV head 1 retrieves; layer 1: KV head 0."""
    return str(HeadScores("llama-tiny", [[0.1, 0.9], [0.8, 0.2]], 4, 256).save(tmp_path / "heads.json"))


def generate(model, config, ids=None, mask=None, new_tokens: int = 10):
    if ids is None:
        ids, mask = prompts()
    return dynasparse.generate(model, ids, mask, max_new_tokens=new_tokens, kv=config)


# --- identity: a budget that holds every token is the full cache ---------------------------------------------

def test_kvzip_with_room_for_everything_equals_the_full_cache():
    model = llama()
    full = generate(model, None)
    assert torch.equal(generate(model, kv(budget=64)).sequences, full.sequences)


def test_head_groups_with_room_for_everything_equal_the_full_cache(head_scores):
    model = llama()
    full = generate(model, None)
    grouped = generate(model, kv(budget=64, head_scores=head_scores, retrieval_heads=0.5, recent=32))
    assert torch.equal(grouped.sequences, full.sequences)


def test_whole_retrieval_heads_with_room_for_everything_equal_the_full_cache(head_scores):
    model = llama()
    full = generate(model, None)
    config = kv(budget=64, head_scores=head_scores, retrieval_heads=0.5, other_heads="policy")
    assert torch.equal(generate(model, config).sequences, full.sequences)


# --- head-level budgets: retrieval heads keep every token, the others what the budget leaves ---------------------

@pytest.mark.parametrize("tier_bits, budget", [(None, 0.75), (4, 0.5)])
def test_whole_retrieval_heads_keep_every_token_and_the_others_the_rest(head_scores, tier_bits, budget):
    model = llama()
    config = kv("kvzip", budget=budget, unit="bytes", head_scores=head_scores, retrieval_heads=0.5,
                other_heads="policy", tier_bits=tier_bits, tier_group=8)
    ids, mask = prompts(length=40)
    out = generate(model, config, ids, mask)
    sites = decoder_for(model, [config]).graph_module.meta["dynasparse_kv_cache"].sites
    assert [site.role for site in sites] == ["retrieval", "other", "retrieval", "other"]
    sequence = ids.shape[1] + 10
    held = [slots + blocks * 8 for slots, blocks in site_sizes(sites, config, sequence)]
    assert held[0] >= sequence and held[2] >= sequence  # the whole sequence, hot or quantized
    assert held[1] < sequence and held[3] < sequence
    assert out.stats.cache_allocated_bytes <= budget * out.stats.cache_full_bytes


# --- batched == alone ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("grouped, prefix, other_heads", [(False, (), "streaming"), (True, (), "streaming"),
                                                         (False, (11, 12, 13), "streaming"), (True, (), "policy")])
def test_batched_rows_equal_rows_alone(grouped, prefix, other_heads, head_scores):
    """Budgets in tokens: a share of the sequence would differ between a padded batch and a row alone."""
    model = llama()
    config = kv(budget=10, head_scores=head_scores if grouped else None, retrieval_heads=0.5, reread_prefix=prefix,
                other_heads=other_heads)
    ids, mask = prompts()
    batched = generate(model, config, ids, mask)
    for row in range(ids.shape[0]):
        real = mask[row].bool()
        alone = generate(model, config, ids[row:row + 1, real], mask[row:row + 1, real])
        assert torch.equal(batched.sequences[row, -10:], alone.sequences[0, -10:])


# --- KVzip's re-read -------------------------------------------------------------------------------------------

def test_the_reread_scores_the_prompt_and_leaves_no_trace():
    """After the re-read the cache holds the prompt alone (the re-read tokens rolled back), and its scores are
    the most attention a re-read query paid each token (every prompt token was looked at)."""
    from dynasparse.runtime.generate import steps_for
    from dynasparse.runtime.steps import prefill

    model = llama()
    ids, mask = prompts(batch=1)
    config = kv(budget=64)  # no eviction: the scores are visible after the prompt
    step = steps_for(model, [config], 1, ids.shape[1] + 4, ids.device, 4)
    prefill(step, ids, mask, config.chunk_size)
    for state in step.cache.states:
        held = state["positions"][state["positions"] >= 0]
        assert sorted(held.unique().tolist()) == list(range(ids.shape[1]))
        assert int(state["seen"][0]) == ids.shape[1]
        scores = state["scores"][state["positions"] >= 0]
        assert bool((scores > 0).all()) and bool((scores <= 1).all())


def test_the_repeat_instruction_leads_each_reread_chunk_and_leaves_no_trace():
    """With ``reread_prefix`` every re-read chunk starts with those ids (after the prompt's positions): the
    scores change, and the cache again holds the prompt alone (batched == alone: the test above)."""
    from dynasparse.runtime.generate import steps_for
    from dynasparse.runtime.steps import prefill

    model = llama()
    ids, mask = prompts(batch=1)
    scores = []
    for prefix in ((), (11, 12, 13)):
        config = kv(budget=64, reread_prefix=prefix)
        step = steps_for(model, [config], 1, ids.shape[1] + 4, ids.device, 4)
        prefill(step, ids, mask, config.chunk_size)
        state = step.cache.states[0]
        assert sorted(state["positions"][state["positions"] >= 0].unique().tolist()) == list(range(ids.shape[1]))
        scores.append(state["scores"][state["positions"] >= 0])
    assert not torch.allclose(scores[0], scores[1])


# --- head groups ---------------------------------------------------------------------------------------------

def test_head_groups_store_each_group_in_caches_of_its_own_size(head_scores):
    model = llama()
    config = kv("h2o", budget=0.5, unit="bytes", head_scores=head_scores, retrieval_heads=0.5)
    out = generate(model, config)
    decoder = decoder_for(model, [config])
    roles = [site.role for site in decoder.graph_module.meta["dynasparse_kv_cache"].sites]
    assert roles == ["retrieval", "streaming", "retrieval", "streaming"]
    streaming = config.sink + config.recent + 1
    assert out.stats.cache_capacity[1] == out.stats.cache_capacity[3] == streaming
    assert out.stats.cache_capacity[0] > streaming
    assert out.stats.cache_allocated_bytes <= 0.5 * out.stats.cache_full_bytes  # scratch slots and counters too


def test_a_byte_budget_counts_every_byte_held():
    model = llama()
    out = generate(model, kv("h2o", budget=0.5, unit="bytes"), new_tokens=16)
    assert 0.45 * out.stats.cache_full_bytes < out.stats.cache_allocated_bytes <= 0.5 * out.stats.cache_full_bytes


def test_the_report_names_each_group(head_scores):
    model = llama()
    optimized = dynasparse.optimize(model, [kv(head_scores=head_scores, retrieval_heads=0.5)],
                                    example_kwargs={"input_ids": torch.zeros(1, 8, dtype=torch.long)})
    text = str(optimized.report)
    assert "retrieval heads" in text and "streaming heads" in text and "KV heads [1]" in text


def test_calibration_ranks_heads_and_round_trips(tmp_path):
    from dynasparse.passes.retrieval_heads import calibration_paragraphs

    tokenizer = _tokenizer()
    model = llama(len(tokenizer))
    scores = calibrate_retrieval_heads(model, tokenizer, samples=2, context_tokens=256,
                                       paragraphs=calibration_paragraphs()[:40])
    assert len(scores.scores) == 2 and all(len(row) == 2 for row in scores.scores)
    assert all(s >= 0 for row in scores.scores for s in row)
    assert HeadScores.load(scores.save(tmp_path / "h.json")) == scores
    assert len(scores.retrieval(0.25)) == 1


def _tokenizer():
    from dynasparse.harness import zoo

    return zoo.load("smollm2").tokenizer


# --- bad input -----------------------------------------------------------------------------------------------

def test_bad_input_fails_clearly(tmp_path, head_scores):
    model = llama()
    with pytest.raises(DynasparseError, match="no head scores"):
        generate(model, kv(head_scores=str(tmp_path / "missing.json")))
    wrong = HeadScores("other", [[0.1, 0.2, 0.3]] * 3, 1, 256).save(tmp_path / "wrong.json")
    with pytest.raises(DynasparseError, match="cover 3 layers"):
        generate(model, kv(head_scores=str(wrong)))
    with pytest.raises(DynasparseError, match="too small for"):
        generate(model, kv("h2o", budget=0.05, unit="bytes", head_scores=head_scores, retrieval_heads=0.5))
    with pytest.raises(DynasparseError, match="unit='bytes'"):
        kv(budget=12, unit="bytes")
    with pytest.raises(DynasparseError, match="retrieval_heads"):
        kv(retrieval_heads=0.0)
    with pytest.raises(DynasparseError, match="at least 256"):
        calibrate_retrieval_heads(model, object(), context_tokens=64)
    with pytest.raises(DynasparseError, match="tokenizer"):
        calibrate_retrieval_heads(model, None)
    with pytest.raises(DynasparseError, match="re-read nothing"):
        kv("h2o", reread_prefix=(5, 6))
    with pytest.raises(DynasparseError, match="token ids"):
        kv(reread_prefix=(5, -1))
    with pytest.raises(DynasparseError, match="other_heads='every'"):
        kv(head_scores=head_scores, other_heads="every")
    with pytest.raises(DynasparseError, match="give head_scores"):
        kv(other_heads="policy")
    with pytest.raises(DynasparseError, match="too small for other_heads='policy'"):
        generate(model, kv(budget=0.3, unit="bytes", head_scores=head_scores, retrieval_heads=0.5, other_heads="policy"),
                 *prompts(length=40))


def test_configs_round_trip_through_json(head_scores):
    config = kv(budget=0.25, unit="bytes", head_scores=head_scores, retrieval_heads=0.3, other_heads="policy")
    assert dynasparse.KVEvictionConfig.from_json(config.to_json()) == config
    config = kv(budget=0.25, reread_prefix=[7, 8, 9])  # a list from JSON comes back as the tuple
    assert dynasparse.KVEvictionConfig.from_json(config.to_json()) == config and config.reread_prefix == (7, 8, 9)


@pytest.mark.slow
def test_compiled_head_groups_with_kvzip_and_a_tier_equal_eager(head_scores):
    """One compiled generation covers both static-shaped modes: head groups with KVzip's re-read, and the
    retrieval groups' int4 tier (spills after the prompt and while decoding, half of the blocks read)."""
    model = llama()
    config = kv(budget=30, head_scores=head_scores, retrieval_heads=0.5, tier_bits=4, tier_group=8, tier_read=0.5)
    ids, mask = prompts(length=48)
    eager = dynasparse.generate(model, ids, mask, max_new_tokens=6, kv=config)
    sites = decoder_for(model, [config]).graph_module.meta["dynasparse_kv_cache"].sites
    assert any(blocks for _, blocks in site_sizes(sites, config, 54))  # the retrieval groups have a tier
    compiled = dynasparse.generate(model, ids, mask, max_new_tokens=6, kv=config, compile=True)
    assert torch.equal(eager.sequences, compiled.sequences)
