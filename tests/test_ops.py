"""dynasparse::attention against its explicit fp32 reference: GQA, masks, causal alignment, dtypes."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynasparse.ir import ops
from dynasparse.kernels.attention import attention_reference, causal_mask


def attention(*args):
    """The op in the graph's [B, H, L, D] convention (the op itself returns sequence-major)."""
    return ops.attention(*args).transpose(1, 2)


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 3), kv_heads=st.integers(1, 3), groups=st.integers(1, 3), q_len=st.integers(1, 9),
       extra_kv=st.integers(0, 6), head_dim=st.sampled_from([4, 8, 16]), causal=st.booleans(),
       mask_kind=st.sampled_from(["none", "bool", "float"]), scale=st.sampled_from([None, 0.3]))
def test_matches_reference(batch, kv_heads, groups, q_len, extra_kv, head_dim, causal, mask_kind, scale):
    kv_len = q_len + extra_kv
    q = torch.randn(batch, kv_heads * groups, q_len, head_dim)
    k, v = torch.randn(2, batch, kv_heads, kv_len, head_dim).unbind(0)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(batch, 1, q_len, kv_len) > 0.3
    elif mask_kind == "float":
        mask = torch.randn(batch, 1, q_len, kv_len)
    out = attention(q, k, v, mask, causal, scale)
    torch.testing.assert_close(out, attention_reference(q, k, v, mask, causal, scale), atol=1e-5, rtol=1e-5)


def test_causal_is_bottom_right_aligned():
    mask = causal_mask(2, 4, torch.device("cpu"))
    assert mask.tolist() == [[True, True, True, False], [True, True, True, True]]


def test_fully_masked_row_gives_zero():
    q = k = v = torch.randn(1, 2, 3, 8)
    mask = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    mask[..., 1, :] = False
    out = attention(q, k, v, mask)
    assert torch.equal(out[..., 1, :], torch.zeros_like(out[..., 1, :]))
    torch.testing.assert_close(out, attention_reference(q, k, v, mask))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    q, k, v = (torch.randn(2, 4, 16, 32).to(dtype) for _ in range(3))
    out = attention(q, k[:, :2], v[:, :2], None, True)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out, attention_reference(q, k[:, :2], v[:, :2], None, True), atol=2e-2, rtol=2e-2)


def test_opcheck():
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    torch.library.opcheck(torch.ops.dynasparse.attention.default, (q, k, v, torch.rand(2, 1, 5, 7) > 0.2, True, 0.5))
