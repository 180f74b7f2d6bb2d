"""Query-aware decode: each step reads the keys its queries weigh most, exactly as a brute-force top-k would."""
import math

import pytest
import torch
import transformers as hf

import dynasparse
from dynasparse import KVEvictionConfig, SparseAttentionConfig
from dynasparse.errors import DynasparseError
from dynasparse.kernels.attention import attention_reference
from dynasparse.kernels.query_aware import query_aware_attention

from default_configs import decoder_prompts, llama


def _inputs(batch=2, q_heads=4, kv_heads=2, length=1, keys=40, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, length, dim, generator=gen)
    k, v = (torch.randn(batch, kv_heads, keys, dim, generator=gen) for _ in range(2))
    visible = torch.ones(batch, 1, length, keys, dtype=torch.bool)
    visible[1, ..., :7] = False  # row 1 cannot read its first keys (padding)
    return q, k, v, visible


def test_keeping_every_key_is_dense_attention():
    q, k, v, visible = _inputs(length=3)
    out, _ = query_aware_attention(q, k, v, visible, None, torch.ones(2))
    groups = q.shape[1] // k.shape[1]
    expected = attention_reference(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), visible)
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("keep", [0.1, 0.3])
def test_reads_exactly_the_top_keys_of_each_kv_head(keep):
    """Brute force: votes = the group's softmax probabilities summed; attention over the top ceil(keep · n)."""
    q, k, v, visible = _inputs()
    out, masses = query_aware_attention(q, k, v, visible, None, torch.full((2,), keep), torch.ones(2, 1))
    groups = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    logits = (q @ kk.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    logits = logits.masked_fill(~visible, -math.inf)
    votes = logits.softmax(-1).reshape(2, k.shape[1], groups, -1).sum(2)  # [B, Hkv, N]
    for row in range(2):
        readable = int(visible[row].sum())
        top = votes[row].topk(math.ceil(keep * readable), -1).indices  # [Hkv, n]
        chosen = torch.zeros_like(votes[row], dtype=torch.bool).scatter_(-1, top, True)
        allowed = chosen.repeat_interleave(groups, 0)[:, None, :] & visible[row]
        expected = attention_reference(q[row:row + 1], kk[row:row + 1], vv[row:row + 1], allowed[None])
        torch.testing.assert_close(out[row], expected[0].transpose(0, 1), atol=1e-5, rtol=0)
        assert torch.equal(masses[row] > 0, chosen)  # masses only where keys were read


def test_generate_reads_fewer_keys_batched_rows_equal_rows_alone_with_and_without_eviction():
    model = llama()
    ids, mask = decoder_prompts()
    select = SparseAttentionConfig(decode_keep=0.2, block_size=16, min_seq_len=32)
    full = dynasparse.generate(model, ids, mask, max_new_tokens=12).sequences
    for configs in ([select], [select, KVEvictionConfig(policy="h2o", budget=40, sink=2, recent=4, chunk_size=24)]):
        batched = dynasparse.generate(model, ids, mask, max_new_tokens=12, configs=configs).sequences
        assert not torch.equal(batched, full)
        for row in range(ids.shape[0]):
            start = int((mask[row] == 0).sum())
            alone = dynasparse.generate(model, ids[row:row + 1, start:], max_new_tokens=12, configs=configs)
            assert torch.equal(alone.sequences[0, -12:], batched[row, -12:]), f"row {row}"


def test_decode_keep_out_of_range_and_onnx_export_fail_clearly(tmp_path):
    with pytest.raises(DynasparseError, match="decode_keep=0.0"):
        SparseAttentionConfig(decode_keep=0.0)
    decoder = dynasparse.runtime.generate.decoder_for(llama(), [SparseAttentionConfig(decode_keep=0.5)])
    with pytest.raises(DynasparseError, match="no ONNX spelling"):
        dynasparse.export_onnx(decoder, tmp_path / "step.onnx")


def test_sparse_prefill_over_a_cache_exports_dense_and_says_so(tmp_path):
    configs = [SparseAttentionConfig(keep_ratio=0.5, block_size=16, min_seq_len=32),
               KVEvictionConfig(policy="h2o", budget=40, sink=2, recent=4)]
    one_block = hf.LlamaForCausalLM(hf.LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                                   num_key_value_heads=2, intermediate_size=128, vocab_size=256)).eval()
    decoder = dynasparse.runtime.generate.decoder_for(one_block, configs)  # one block: the export is the cost
    with pytest.warns(UserWarning, match="no ONNX spelling yet: the exported step reads every block"):
        dynasparse.export_onnx(decoder, tmp_path / "step.onnx")
