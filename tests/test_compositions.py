"""Techniques composed: sparse prefill + bounded cache, self-speculative decoding + bounded cache, token merging
+ exit gates. At zero sparsity each composition is the dense model; with sparsity a batched row is the row
alone."""
import pytest
import torch
import transformers as hf

import dynasparse
from dynasparse import ExitGateConfig, KVEvictionConfig, SparseAttentionConfig, TokenMergeConfig
from dynasparse.ir.ops import KV_CACHE_SPARSE_ATTENTION
from dynasparse.runtime.draft_choice import DraftChooser

VOCAB = 256


def _llama(layers: int = 3) -> hf.LlamaForCausalLM:
    torch.manual_seed(0)
    config = hf.LlamaConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=128, vocab_size=VOCAB)
    return hf.LlamaForCausalLM(config).eval()


def _prompts(batch: int = 3, length: int = 80) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1:, :9] = 0  # left-padded rows
    return ids, mask


def _sparse(keep: float) -> SparseAttentionConfig:
    return SparseAttentionConfig(keep_ratio=keep, block_size=16, min_seq_len=32, local_blocks=1, sink_blocks=1)


def _cache(policy: str, budget, chunk: int = 24) -> KVEvictionConfig:
    return KVEvictionConfig(policy=policy, budget=budget, sink=2, recent=4, chunk_size=chunk)


# --- sparse prefill + bounded cache -----------------------------------------------------------------------------

def test_sparse_sites_get_a_cache_that_plans_over_cache_and_chunk():
    model = _llama()
    optimized = dynasparse.optimize(model, [_cache("h2o", 32), _sparse(0.5)],
                                    example_kwargs={"input_ids": torch.zeros(1, 64, dtype=torch.long)})
    targets = [n.target for n in optimized.graph_module.graph.nodes if n.op == "call_function"]
    assert targets.count(KV_CACHE_SPARSE_ATTENTION) == 3
    assert "block-sparse prefill" in str(optimized.report)


@pytest.mark.parametrize("policy", ["h2o", "snapkv", "tova", "streaming", "full"])
def test_sparse_prefill_keeping_every_block_with_a_roomy_cache_is_plain_greedy(policy):
    model, (ids, mask) = _llama(), _prompts()
    plain = dynasparse.generate(model, ids, mask, max_new_tokens=12)
    out = dynasparse.generate(model, ids, mask, max_new_tokens=12, kv=_cache(policy, 10_000),
                              configs=[_sparse(1.0)])
    assert torch.equal(out.sequences, plain.sequences)


@pytest.mark.parametrize("policy", ["h2o", "snapkv"])
def test_sparse_prefill_with_eviction_batched_rows_equal_rows_alone(policy):
    model, (ids, mask) = _llama(), _prompts()
    kwargs = dict(max_new_tokens=10, kv=_cache(policy, 40), configs=[_sparse(0.5)])
    batched = dynasparse.generate(model, ids, mask, **kwargs).sequences
    for row in range(ids.shape[0]):
        alone = dynasparse.generate(model, ids[row:row + 1, mask[row].bool()], **kwargs).sequences
        assert torch.equal(batched[row, -10:], alone[0, -10:])


# --- self-speculative decoding + bounded cache ------------------------------------------------------------------

def test_self_speculative_with_a_roomy_bounded_cache_is_plain_greedy():
    model, (ids, mask) = _llama(), _prompts(length=20)
    plain = dynasparse.generate(model, ids, mask, max_new_tokens=20)
    out = dynasparse.generate(model, ids, mask, max_new_tokens=20, kv=_cache("h2o", 10_000),
                              early_exit=ExitGateConfig(after_blocks=(0,), mode="draft"))
    assert torch.equal(out.sequences, plain.sequences)


def test_self_speculative_cache_bytes_stay_constant_once_full():
    model, (ids, mask) = _llama(), _prompts(length=20)
    out = dynasparse.generate(model, ids, mask, max_new_tokens=40, kv=_cache("h2o", 16),
                              early_exit=ExitGateConfig(after_blocks=(0,), mode="draft"))
    used = out.stats.cache_used_bytes
    assert out.sequences.shape[1] == 60
    full = used.index(max(used))
    assert full < len(used) // 2 and set(used[full:]) == {max(used)}, used  # once full, it stays at the budget
    assert used[-1] <= out.stats.cache_allocated_bytes


@pytest.mark.parametrize("policy", ["streaming", "h2o"])
def test_self_speculative_with_eviction_batched_rows_equal_rows_alone(policy, monkeypatch):
    """Over a bounded cache the tokens depend on the rounds drafted (a verify pass's later queries see tokens a
    plain step would have evicted), and the chooser picks rounds from timings: so the rounds are fixed here."""
    monkeypatch.setattr(DraftChooser, "choose", lambda self: (0, 2))
    model, (ids, mask) = _llama(), _prompts(length=20)
    kwargs = dict(max_new_tokens=16, kv=_cache(policy, 16), early_exit=ExitGateConfig(after_blocks=(0,),
                                                                                      mode="draft"))
    batched = dynasparse.generate(model, ids, mask, **kwargs).sequences
    for row in range(ids.shape[0]):
        alone = dynasparse.generate(model, ids[row:row + 1, mask[row].bool()], **kwargs).sequences
        assert torch.equal(batched[row, -16:], alone[0, -16:])


# --- token merging + exit gates on an encoder classifier --------------------------------------------------------

def _bert() -> hf.BertForSequenceClassification:
    torch.manual_seed(0)
    config = hf.BertConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                           vocab_size=VOCAB, num_labels=5)
    return hf.BertForSequenceClassification(config).eval()


def _text(batch: int = 6, length: int = 24) -> dict:
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[-2:, -7:] = 0  # right-padded rows, as tokenizers pad encoders
    return {"input_ids": ids, "attention_mask": mask}


def _logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out[0]


def test_merging_nothing_with_gates_that_never_fire_is_the_dense_classifier():
    model, inputs = _bert(), _text()
    optimized = dynasparse.optimize(model, [ExitGateConfig(threshold=1.0), TokenMergeConfig.tome(r=0)],
                                    example_kwargs=inputs)
    assert not optimized.report.left_dense, optimized.report
    torch.testing.assert_close(_logits(optimized, inputs), _logits(model, inputs), atol=1e-5, rtol=0)


def test_each_gate_head_reads_the_stream_merged_so_far():
    """With every row leaving at the first gate, the output is the classifier's own head on block 0's merged
    stream, unmerged: the dense model cut after block 0 when block 0 merges nothing."""
    model, inputs = _bert(), _text()
    gate = ExitGateConfig(after_blocks=(0,), threshold=0.0)
    merged = dynasparse.optimize(model, [gate, TokenMergeConfig.tome(r=(0, 4, 4, 4))], example_kwargs=inputs)
    unmerged = dynasparse.optimize(model, gate, example_kwargs=inputs)
    torch.testing.assert_close(_logits(merged, inputs), _logits(unmerged, inputs), atol=1e-5, rtol=0)
    assert merged.exit_blocks.eq(0).all()


def test_merging_with_gates_batched_rows_equal_rows_alone():
    model, inputs = _bert(), _text()
    optimized = dynasparse.optimize(model, [TokenMergeConfig.tome(keep_ratio=0.5), ExitGateConfig(threshold=0.3)],
                                    example_kwargs=inputs)
    batched = _logits(optimized, inputs)
    for row in range(inputs["input_ids"].shape[0]):
        alone = _logits(optimized, {k: v[row:row + 1] for k, v in inputs.items()})
        torch.testing.assert_close(batched[row:row + 1], alone, atol=1e-5, rtol=0)
