"""Token Sparse Attention (``SparseAttentionConfig(token_keep=...)``): each KV head attends among the tokens it
keeps and gives the others nothing; keeping every token is dense attention; bad combinations are refused.
(Identity, batched == alone and opcheck: the ``sparse-tokens`` entries of ``default_configs.DEFAULTS``.)"""
import pytest
import torch
import transformers as hf

import dynasparse
from dynasparse import DynasparseError, KVEvictionConfig, SparseAttentionConfig
from dynasparse.kernels.attention import attention_sdpa, causal_mask
from dynasparse.kernels.token_sparse import token_sparse_attention

B, KV, GROUPS, L, D = 2, 2, 3, 64, 16


def _qkv():
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(B, KV * GROUPS, L, D, generator=generator), torch.randn(B, KV, L, D, generator=generator),
            torch.randn(B, KV, L, D, generator=generator))


def _padded_causal() -> torch.Tensor:
    mask = causal_mask(L, L, torch.device("cpu"))[None, None].expand(B, 1, L, L).clone()
    mask[1, :, :, :5] = False  # row 1 is left-padded
    return mask


@pytest.mark.parametrize("mask, is_causal", [(None, True), (None, False), ("padded", False)],
                         ids=["causal", "bidirectional", "padded-causal-mask"])
def test_keeping_every_token_is_dense_attention(mask, is_causal):
    q, k, v = _qkv()
    mask = _padded_causal() if mask == "padded" else None
    expected = attention_sdpa(q, k, v, mask, is_causal, None).transpose(1, 2)
    got = token_sparse_attention(q, k, v, mask, is_causal, None, keep=0.999, window=8, min_seq_len=0)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_kept_tokens_attend_among_themselves_and_the_rest_get_nothing():
    q, k, v = _qkv()
    out = token_sparse_attention(q, k, v, None, True, None, keep=0.5, window=8, min_seq_len=0)  # [B, L, Hq, D]
    for row in range(B):
        for head in range(KV * GROUPS):
            kept = out[row, :, head].abs().sum(-1) > 0
            assert kept.sum() == L // 2 and kept[-8:].all()  # half the tokens, the probes among them
            positions = kept.nonzero()[:, 0]
            sub = [x[row:row + 1, h:h + 1, positions] for x, h in ((q, head), (k, head // GROUPS), (v, head // GROUPS))]
            torch.testing.assert_close(out[row, positions, head], attention_sdpa(*sub, None, True, None)[0, 0])


def test_short_sequences_run_dense_and_the_config_says_what_is_wrong():
    q, k, v = _qkv()
    torch.testing.assert_close(token_sparse_attention(q, k, v, None, True, None, 0.5, 8, min_seq_len=L + 1),
                               attention_sdpa(q, k, v, None, True, None).transpose(1, 2))
    with pytest.raises(DynasparseError, match="instead of blocks"):
        SparseAttentionConfig(token_keep=0.5, keep_ratio=0.5)
    with pytest.raises(DynasparseError, match="token_keep"):
        SparseAttentionConfig(token_keep=0.0)


def test_a_cache_or_an_export_is_refused(tmp_path):
    torch.manual_seed(0)
    llama = hf.LlamaForCausalLM(hf.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, intermediate_size=64)).eval()
    ids = torch.randint(0, 64, (1, 40))
    with pytest.raises(DynasparseError, match="KVEvictionConfig reads every token"):
        dynasparse.optimize(llama, [SparseAttentionConfig(token_keep=0.5), KVEvictionConfig(budget=0.5)],
                            example_inputs=(ids,))
    optimized = dynasparse.optimize(llama, [SparseAttentionConfig(token_keep=0.5, min_seq_len=32, window=8)],
                                    example_inputs=(ids,))
    assert "tokens 0.5 per KV head" in str(optimized.report)
    with pytest.raises(DynasparseError, match="no ONNX spelling"):
        dynasparse.export_onnx(optimized, tmp_path / "m.onnx")


def test_a_causal_mask_without_padding_takes_the_causal_path():
    """Hugging Face hands causality as a mask; with no padding in it the kept tokens need no gathered mask."""
    q, k, v = _qkv()
    mask = causal_mask(L, L, torch.device("cpu"))[None, None].expand(B, 1, L, L)
    torch.testing.assert_close(token_sparse_attention(q, k, v, mask, True, None, 0.5, 8, 0),
                               token_sparse_attention(q, k, v, None, True, None, 0.5, 8, 0))
