"""Block-sparse kernels against brute force: any plan, shapes, block sizes, causal or not, GQA, masks."""
import math
import warnings

import pytest
import torch

from dynasparse.kernels import sparse_attention as sa
from dynasparse.kernels import sparse_attention_triton as st
from dynasparse.kernels.attention import attention_reference
from dynasparse.kernels.blocks import keys_per_block, num_blocks, pad_to_blocks
from dynasparse.kernels.estimators import ESTIMATORS, EstimatorInputs, antidiagonal

# (batch, q heads, kv heads, q len, kv len, block, head dim)
SHAPES = [(2, 4, 2, 50, 50, 16, 16), (1, 2, 1, 7, 40, 16, 24), (2, 4, 4, 33, 70, 32, 32), (3, 6, 2, 64, 64, 8, 8)]


def qkv(batch, q_heads, kv_heads, q_len, kv_len, head_dim, dtype=torch.float32):
    return (torch.randn(batch, q_heads, q_len, head_dim, dtype=dtype),
            torch.randn(batch, kv_heads, kv_len, head_dim, dtype=dtype),
            torch.randn(batch, kv_heads, kv_len, head_dim, dtype=dtype))


def masks(batch, q_heads, q_len, kv_len):
    padding = torch.ones(batch, 1, 1, kv_len, dtype=torch.bool)
    padding[0, ..., :5] = False
    additive = torch.zeros(batch, q_heads, q_len, kv_len).masked_fill(torch.rand(batch, q_heads, q_len, kv_len) < 0.2,
                                                                       -1e9)
    return [None, padding, additive]


def random_plan(batch, kv_heads, q_len, kv_len, block, keep=0.5):
    """Any plan: a random subset of blocks per row (possibly empty, possibly beyond the diagonal)."""
    nq, nk = num_blocks(q_len, block), num_blocks(kv_len, block)
    chosen = torch.rand(batch, kv_heads, nq, nk) < keep
    counts = chosen.sum(-1).to(torch.int32)
    order = torch.where(chosen, torch.arange(nk), nk).sort(-1).values
    return counts, torch.where(order < nk, order, 0).to(torch.int32)


# The CPU gather path and the Triton prefill kernel (TRITON_INTERPRET=1 on CPU; its tiles need blocks >= 16).
IMPLEMENTATIONS = {"gather": sa.sparse_attention_gather, "triton": st.block_sparse_attention_triton}


@pytest.mark.parametrize("implementation, shape", [(name, shape) for name in IMPLEMENTATIONS for shape in SHAPES
                                                    if name == "gather" or shape[5] >= 16])
@pytest.mark.parametrize("causal", [True, False])
def test_block_sparse_attention_is_exact_for_any_plan(implementation, shape, causal):
    batch, q_heads, kv_heads, q_len, kv_len, block, head_dim = shape
    q, k, v = qkv(batch, q_heads, kv_heads, q_len, kv_len, head_dim)
    for mask in masks(batch, q_heads, q_len, kv_len):
        counts, indices = random_plan(batch, kv_heads, q_len, kv_len, block)
        expected = sa.sparse_attention_reference(q, k, v, mask, causal, None, counts, indices, block)
        actual = IMPLEMENTATIONS[implementation](q, k, v, mask, causal, None, counts, indices, block)
        torch.testing.assert_close(actual.transpose(1, 2), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
def test_keep_all_plan_is_dense_attention(shape, causal):
    batch, q_heads, kv_heads, q_len, kv_len, block, head_dim = shape
    q, k, v = qkv(batch, q_heads, kv_heads, q_len, kv_len, head_dim)
    for mask in masks(batch, q_heads, q_len, kv_len):
        for estimator in ESTIMATORS:
            counts, indices = sa.build_plan(q, k, mask, causal, None, block, estimator, "keep_ratio", 1.0, 1, 1, 0, 8)
            actual = sa.sparse_attention_gather(q, k, v, mask, causal, None, counts, indices, block)
            expected = attention_reference(q, k, v, mask, causal, None)
            torch.testing.assert_close(actual.transpose(1, 2), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
@pytest.mark.parametrize("selector, amount", [("topk", 3), ("keep_ratio", 0.3), ("mass", 0.7)])
@pytest.mark.parametrize("causal", [True, False])
def test_plans_are_well_formed(estimator, selector, amount, causal):
    batch, q_heads, kv_heads, length, block = 2, 4, 2, 150, 16
    q, k, _ = qkv(batch, q_heads, kv_heads, length, length, 16)
    mask = torch.ones(batch, 1, 1, length, dtype=torch.bool)
    mask[1, ..., :40] = False  # left padding: the first 2 blocks of row 1 have no real key
    counts, indices = sa.build_plan(q, k, mask, causal, None, block, estimator, selector, amount, 1, 1, 0, 16)
    nq = nk = num_blocks(length, block)
    assert counts.shape == (batch, kv_heads, nq) and indices.shape == (batch, kv_heads, nq, nk)
    valid, forced = sa.block_layout(length, length, block, causal, 1, 1, torch.device("cpu"))
    for b in range(batch):
        has_keys = torch.ones(nk, dtype=torch.bool) if b == 0 else torch.arange(nk) * block + block > 40
        for h in range(kv_heads):
            for r in range(nq):
                listed = indices[b, h, r, :counts[b, h, r]].tolist()
                allowed = (valid[r] & has_keys).nonzero().flatten().tolist()
                assert listed == sorted(set(listed)) and set(listed) <= set(allowed)
                assert set((forced[r] & has_keys).nonzero().flatten().tolist()) <= set(listed)
                if selector == "keep_ratio":
                    need = max(math.ceil(amount * len(allowed) - 1e-6), int((forced[r] & has_keys).sum()))
                    assert len(listed) == min(need, len(allowed))
                if selector == "topk":
                    assert len(listed) == min(max(3, int((forced[r] & has_keys).sum())), len(allowed))


def test_pooled_estimator_finds_the_block_the_queries_point_at():
    q = torch.zeros(1, 1, 128, 16)
    k = torch.randn(1, 1, 128, 16) * 0.01
    q[..., 0] = 1.0
    k[0, 0, 64:80, 0] = 10.0  # block 4 (of 16 tokens) holds the keys every query matches
    counts, indices = sa.build_plan(q, k, None, False, None, 16, "pooled", "topk", 1, 0, 0, 0, 16)
    assert (counts == 1).all() and (indices[..., 0] == 4).all()


def test_vertical_slash_estimator_finds_a_heavy_column():
    torch.manual_seed(0)
    q = torch.randn(1, 2, 128, 16) * 0.1
    k = torch.randn(1, 2, 128, 16) * 0.1
    q[..., 0] = 3.0
    k[:, :, 37, 0] = 8.0  # one key everybody attends to (a vertical line) in block 2
    counts, indices = sa.build_plan(q, k, None, True, None, 16, "vertical_slash", "topk", 2, 0, 1, 0, 16)
    for r in range(3, 8):
        assert 2 in indices[0, 0, r, :counts[0, 0, r]].tolist()


@pytest.mark.parametrize("q_len, kv_len", [(100, 100), (37, 130)])
def test_antidiagonal_estimator_at_stride_one_is_the_true_block_mass(q_len, kv_len, monkeypatch):
    """With 1x1 tiles the antidiagonal sums are the scores themselves: the estimate must be each block's
    real attention mass (causal, bottom-right aligned, padded keys hidden), chunked or not."""
    monkeypatch.setattr(antidiagonal, "_CHUNK", 32)
    q, k, v = qkv(2, 4, 2, q_len, kv_len, 16)
    key_valid = torch.ones(2, kv_len, dtype=torch.bool)
    key_valid[1, :5] = False  # left padding in the second row
    inputs = EstimatorInputs(q, k, mask=None, key_valid=key_valid, is_causal=True, block_size=16, scale=0.25,
                             window=64)
    estimate = antidiagonal.antidiagonal_scores(inputs, stride=1).exp()
    allowed = sa.causal_mask(q_len, kv_len, q.device) & key_valid[:, None, None, :]
    scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.25
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)  # all-padding rows: 0
    nq, nk = num_blocks(q_len, 16), num_blocks(kv_len, 16)
    probs = pad_to_blocks(pad_to_blocks(probs, 2, 16), 3, 16).view(2, 2, 2, nq, 16, nk, 16)
    rows = keys_per_block(None, 1, q_len, 16, q.device)[0]
    truth = probs.sum((2, 4, 6)) / (2 * rows[:, None])
    torch.testing.assert_close(estimate.where(truth > 0, 0.0), truth, atol=1e-5, rtol=1e-4)


def test_antidiagonal_estimator_finds_a_heavy_column():
    torch.manual_seed(0)
    q = torch.randn(1, 2, 128, 16) * 0.1
    k = torch.randn(1, 2, 128, 16) * 0.1
    q[..., 0] = 3.0
    k[:, :, 37, 0] = 8.0  # one key every query attends to, in block 2
    counts, indices = sa.build_plan(q, k, None, True, None, 16, "antidiagonal", "topk", 2, 0, 1, 0, 16)
    for r in range(3, 8):
        assert 2 in indices[0, 0, r, :counts[0, 0, r]].tolist()


def test_mass_selector_keeps_more_blocks_for_flat_attention():
    q, k, _ = qkv(1, 1, 1, 256, 256, 16)
    flat_counts, _ = sa.build_plan(q * 0, k, None, True, None, 16, "pooled", "mass", 0.5, 0, 0, 0, 16)
    peaked_q = q.clone()
    peaked_q[..., 0] = 50.0
    peaked_k = k.clone()
    peaked_k[:, :, :16, 0] = 5.0
    peaked_counts, _ = sa.build_plan(peaked_q, peaked_k, None, True, None, 16, "pooled", "mass", 0.5, 0, 0, 0, 16)
    assert peaked_counts.sum() < flat_counts.sum()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gather(dtype):
    q, k, v = qkv(2, 4, 2, 64, 64, 16, dtype)
    counts, indices = random_plan(2, 2, 64, 64, 16)
    expected = sa.sparse_attention_reference(q.float(), k.float(), v.float(), None, True, None, counts, indices, 16)
    actual = sa.sparse_attention_gather(q, k, v, None, True, None, counts, indices, 16)
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.transpose(1, 2).float(), expected, atol=2e-2, rtol=0)


@pytest.mark.parametrize("causal", [True, False])
def test_plan_converts_to_a_flex_attention_block_mask(causal):
    from torch.nn.attention.flex_attention import flex_attention

    q, k, v = qkv(2, 4, 2, 64, 64, 16)
    counts, indices = sa.build_plan(q, k, None, causal, None, 16, "pooled", "topk", 2, 0, 1, 0, 16)
    block_mask = sa.to_block_mask(counts, indices, 16, 64, 64, 4, is_causal=causal)
    expected = sa.sparse_attention_reference(q, k, v, None, causal, None, counts, indices, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention warns that it is unfused
        actual = flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


# --- Triton kernels (TRITON_INTERPRET=1 on CPU) ----------------------------------------------------------------

@pytest.mark.parametrize("q_len", [1, 3])
def test_triton_decode_matches_the_reference(q_len):
    batch, q_heads, kv_heads, kv_len, block = 2, 8, 2, 90, 16
    q, k, v = qkv(batch, q_heads, kv_heads, q_len, kv_len, 32)
    for mask in masks(batch, q_heads, q_len, kv_len):
        counts, indices = sa.build_plan(q, k, mask, True, None, block, "pooled", "keep_ratio", 0.5, 1, 1, 0, 16)
        expected = sa.sparse_attention_reference(q, k, v, mask, True, None, counts, indices, block)
        actual = st.block_sparse_decode_triton(q, k, v, mask, True, None, counts, indices, block)
        torch.testing.assert_close(actual.transpose(1, 2), expected, atol=1e-5, rtol=0)


def test_triton_prefill_half_precision():
    q, k, v = qkv(1, 2, 1, 48, 48, 16, torch.float16)
    counts, indices = random_plan(1, 1, 48, 48, 16)
    expected = sa.sparse_attention_reference(q.float(), k.float(), v.float(), None, True, None, counts, indices, 16)
    actual = st.block_sparse_attention_triton(q, k, v, None, True, None, counts, indices, 16)
    torch.testing.assert_close(actual.transpose(1, 2).float(), expected, atol=2e-2, rtol=0)


@pytest.mark.parametrize("selector, amount", [("topk", 2), ("keep_ratio", 0.4), ("mass", 0.8)])
@pytest.mark.parametrize("causal", [True, False])
def test_fused_pooled_select_matches_the_reference(selector, amount, causal):
    q, k, _ = qkv(2, 4, 2, 70, 90, 16)
    mask = torch.ones(2, 1, 1, 90, dtype=torch.bool)
    mask[1, ..., :20] = False
    expected = sa.build_plan(q, k, mask, causal, None, 16, "pooled", selector, amount, 1, 1, 0, 16)
    actual = st.pooled_plan(q, k, mask, causal, None, 16, selector, amount, 1, 1)
    assert torch.equal(actual[0], expected[0])
    listed = torch.arange(expected[1].shape[-1]) < expected[0][..., None]
    assert torch.equal(actual[1] * listed, expected[1] * listed)


@pytest.mark.parametrize("q_len, kv_len, causal, dtype", [(200, 200, True, torch.float32),
                                                          (96, 230, True, torch.float32),
                                                          (130, 300, False, torch.float32),
                                                          (200, 200, False, torch.bfloat16)])
def test_cpu_kernel_matches_the_reference(q_len, kv_len, causal, dtype):
    """The C++ kernel that reads the listed blocks in place: lengths not a multiple of the block, grouped
    heads, a chunk after a cache (causal offset), runs of adjacent blocks merged into one GEMM."""
    from dynasparse.kernels import sparse_attention_cpu as sc
    from dynasparse.ir.ops import block_sparse_attention

    q, k, v = qkv(2, 4, 2, q_len, kv_len, 32, dtype)
    for keep in (0.5, 0.9):  # scattered blocks, then mostly adjacent runs
        counts, indices = sa.build_plan(q, k, None, causal, None, 16, "pooled", "keep_ratio", keep, 1, 1, 0, 16)
        assert sc.usable(q, k, None, causal, 16)
        expected = sa.sparse_attention_reference(q.float(), k.float(), v.float(), None, causal, None, counts,
                                                 indices, 16)
        actual = block_sparse_attention(q, k, v, None, counts, indices, causal, None, 16, 0)
        assert actual.dtype == dtype
        torch.testing.assert_close(actual.transpose(1, 2).float(), expected, atol=1e-5 if dtype == torch.float32
                                   else 2e-2, rtol=0)


def test_a_causal_mask_tensor_takes_the_cpu_kernel():
    """Hugging Face passes its causal mask as a tensor: one that hides only the future is dropped for the
    C++ kernel (same result); one that also hides a padded key keeps the exact gather path."""
    from dynasparse.kernels import sparse_attention_cpu as sc
    from dynasparse.ir.ops import block_sparse_attention

    q, k, v = qkv(1, 4, 2, 200, 200, 32, torch.float32)
    causal = torch.ones(200, 200, dtype=torch.bool).tril()[None, None]
    padded = causal.clone()
    padded[..., 3] = False
    assert sc.usable(q, k, causal, True, 16) and not sc.usable(q, k, padded, True, 16)
    assert not sc.usable(q, k, causal, False, 16)
    for mask in (causal, padded):
        counts, indices = sa.build_plan(q, k, mask, True, None, 16, "antidiagonal", "keep_ratio", 0.5, 1, 1, 0, 16)
        expected = sa.sparse_attention_reference(q, k, v, mask, True, None, counts, indices, 16)
        actual = block_sparse_attention(q, k, v, mask, counts, indices, True, None, 16, 0)
        torch.testing.assert_close(actual.transpose(1, 2), expected, atol=1e-5, rtol=0)
