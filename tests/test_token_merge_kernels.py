"""The Triton token-merge kernels against their torch references.

On a machine without an NVIDIA GPU, tests/conftest.py sets ``TRITON_INTERPRET=1`` before anything imports
triton, so these tests run the kernels under Triton's interpreter on CPU tensors; on a GPU they run compiled.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:  # a declared dependency on Linux: missing is an error, not a skip
    raise ImportError("tests/test_token_merge_kernels.py needs `triton` (a declared dependency of dynasparse on "
                      "Linux); install it, e.g. `pip install triton`.")

from dynasparse.kernels import token_merge, token_merge_triton  # noqa: E402
from dynasparse.kernels.token_merge import best_match_reference, merge_scatter_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def kernels():
    """The kernel module (interpreted on CPU, compiled on a GPU)."""
    return token_merge_triton


# ---------------------------------------------------------------------------------------------------------
# Inputs and checks
# ---------------------------------------------------------------------------------------------------------

def _roles(batch: int, length: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random src / dst / neither roles; row 1 has no dst and row 2 no src (when there are such rows)."""
    role = torch.randint(0, 3, (batch, length), generator=gen)  # 0 neither, 1 src, 2 dst
    if batch > 1:
        role[1] = torch.where(role[1] == 2, torch.zeros_like(role[1]), role[1])
    if batch > 2:
        role[2] = torch.where(role[2] == 1, torch.zeros_like(role[2]), role[2])
    return role == 1, role == 2


def _reference_scores(metric, is_dst):
    unit = metric.float() / metric.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (unit @ unit.transpose(-1, -2)).masked_fill(~is_dst[:, None, :], float("-inf"))


def _check_best_match(module, metric, is_src, is_dst, atol: float, tie: float):
    best, index = module.best_match_triton(metric, is_src, is_dst)
    ref_best, ref_index = best_match_reference(metric, is_src, is_dst)
    assert best.dtype == torch.float32 and index.dtype == torch.int64
    assert best.shape == ref_best.shape and index.shape == ref_index.shape
    assert best.device == metric.device and index.device == metric.device
    best, index, ref_best, ref_index = best.cpu(), index.cpu(), ref_best.cpu(), ref_index.cpu()
    is_src, is_dst = is_src.cpu(), is_dst.cpu()
    torch.testing.assert_close(best, ref_best, atol=atol, rtol=0)  # equal infinities count as close
    assert (best[~is_src] == float("-inf")).all() and (index[~is_src] == 0).all()
    # The chosen dst is a best one (by the reference's own scores), and the very one where the best is clear.
    scores = _reference_scores(metric.cpu(), is_dst)
    has_match = is_src & is_dst.any(dim=1, keepdim=True)
    picked = scores.gather(2, index[..., None])[..., 0]
    torch.testing.assert_close(picked[has_match], ref_best[has_match], atol=2 * atol, rtol=0)
    near = (scores >= ref_best[..., None] - tie).sum(dim=-1)  # dst columns within `tie` of the best
    clear = ~has_match | (near == 1)
    assert torch.equal(index[clear], ref_index[clear])
    return int(clear.sum()), clear.numel()


def _check_merge_scatter(module, x, size, target, capacity: int, atol: float):
    new_x, new_size = module.merge_scatter_triton(x, size, target, capacity)
    ref_x, ref_size = merge_scatter_reference(x, size, target, capacity)
    assert new_x.dtype == x.dtype and new_size.dtype == torch.float32
    assert new_x.shape == ref_x.shape and new_size.shape == ref_size.shape and new_x.device == x.device
    torch.testing.assert_close(new_size.cpu(), ref_size.cpu(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new_x.cpu().float(), ref_x.cpu().float(), atol=atol, rtol=atol)
    empty = ref_size.cpu() == 0
    assert (new_x.cpu()[empty] == 0).all()


def _merge_inputs(batch, length, hidden, capacity, dtype, device, gen):
    x = torch.randn(batch, length, hidden, generator=gen).to(dtype)
    size = torch.randint(1, 5, (batch, length), generator=gen).float()
    size[torch.rand(batch, length, generator=gen) < 0.3] = 0.0  # padding / pruned slots carry no weight
    target = torch.randint(0, capacity, (batch, length), generator=gen)
    return x.to(device), size.to(device), target.to(device)


BEST_MATCH_SHAPES = [(b, length, c) for length in (1, 7, 33, 130) for c, b in ((8, 3), (32, 2), (64, 1))]
MERGE_SHAPES = [(1, 1, 16, 1), (3, 7, 48, 5), (2, 33, 16, 40), (2, 130, 48, 70), (1, 130, 16, 3)]


def _run_best_match(module, device, batch, length, channels, dtype, atol, tie, seed=0):
    gen = torch.Generator().manual_seed(seed + 1000 * length + channels)
    metric = torch.randn(batch, length, channels, generator=gen).to(dtype).to(device)
    is_src, is_dst = _roles(batch, length, gen)
    return _check_best_match(module, metric, is_src.to(device), is_dst.to(device), atol, tie)


def _run_merge(module, device, batch, length, hidden, capacity, dtype, atol, seed=0):
    gen = torch.Generator().manual_seed(seed + 1000 * length + hidden)
    x, size, target = _merge_inputs(batch, length, hidden, capacity, dtype, device, gen)
    _check_merge_scatter(module, x, size, target, capacity, atol)


# ---------------------------------------------------------------------------------------------------------
# The kernels (kernels on CPU, compiled on a GPU)
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch,length,channels", BEST_MATCH_SHAPES)
def test_best_match_fp32(kernels, batch, length, channels):
    _run_best_match(kernels, DEVICE, batch, length, channels, torch.float32, atol=1e-5, tie=1e-6)


@pytest.mark.parametrize("batch,length,channels", [(2, 33, 32), (1, 130, 64), (3, 7, 8)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_best_match_half(kernels, batch, length, channels, dtype):
    # The reference upcasts the same 16-bit values, so only the summation order differs.
    _run_best_match(kernels, DEVICE, batch, length, channels, dtype, atol=2e-3, tie=2e-3)


@pytest.mark.parametrize("channels", [1, 3, 100, 300])
def test_best_match_odd_channels(kernels, channels):
    """C below the minimum dot size, not a power of two, and over several BLOCK_C (32) chunks."""
    _run_best_match(kernels, DEVICE, 2, 40, channels, torch.float32, atol=1e-5, tie=1e-6)


def test_best_match_ties_take_first_index(kernels):
    """Exact ties (scores are multiples of 1/4 here) pick the lowest dst index, as torch.max does."""
    gen = torch.Generator().manual_seed(3)
    batch, length, channels = 2, 130, 8
    # rows with four ones out of eight: norm 2, so every cosine is exact in fp32
    keys = torch.rand(batch, length, channels, generator=gen).argsort(dim=-1)[..., :4]
    metric = torch.zeros(batch, length, channels).scatter_(2, keys, 1.0)
    is_src, is_dst = _roles(batch, length, gen)
    best, index = kernels.best_match_triton(metric.to(DEVICE), is_src.to(DEVICE), is_dst.to(DEVICE))
    ref_best, ref_index = best_match_reference(metric, is_src, is_dst)
    assert torch.equal(best.cpu(), ref_best) and torch.equal(index.cpu(), ref_index)
    # and the ties are real: most src rows share their best with a later dst
    near = (_reference_scores(metric, is_dst) == ref_best[..., None]).sum(-1)
    assert (near[is_src & is_dst.any(1, keepdim=True)] > 1).float().mean() > 0.5


def test_best_match_alternating_roles_and_edge_rows(kernels):
    """plan_merge's own roles (alternating, padding excluded), a zero metric row, and rows with no candidates."""
    gen = torch.Generator().manual_seed(4)
    batch, length, channels = 4, 33, 32
    metric = torch.randn(batch, length, channels, generator=gen)
    metric[0, 5] = 0.0  # zero norm: clamped, scores 0
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[1, :10] = False  # left padding
    valid[2, 20:] = False  # right padding
    valid[3] = False  # nothing at all
    rank = valid.long().cumsum(1) - 1
    is_src, is_dst = valid & (rank % 2 == 0), valid & (rank % 2 == 1)
    _check_best_match(kernels, metric.to(DEVICE), is_src.to(DEVICE), is_dst.to(DEVICE), atol=1e-5, tie=1e-6)


def test_best_match_strided_inputs(kernels):
    """Non-contiguous metric (a transposed view) and role masks (column slices)."""
    gen = torch.Generator().manual_seed(5)
    metric = torch.randn(2, 32, 70, generator=gen).to(DEVICE).transpose(1, 2)  # [2, 70, 32], channel stride 70
    is_src, is_dst = (m.to(DEVICE) for m in _roles(2, 140, gen))
    _check_best_match(kernels, metric, is_src[:, ::2], is_dst[:, 1::2], atol=1e-5, tie=1e-6)


@pytest.mark.parametrize("batch,length,hidden,capacity", MERGE_SHAPES)
def test_merge_scatter_fp32(kernels, batch, length, hidden, capacity):
    _run_merge(kernels, DEVICE, batch, length, hidden, capacity, torch.float32, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_merge_scatter_half(kernels, dtype):
    atol = 2e-3 if dtype == torch.float16 else 1.6e-2  # one rounding of the output to the 16-bit type
    _run_merge(kernels, DEVICE, 2, 130, 48, 70, dtype, atol=atol)


def test_merge_scatter_strided_and_all_empty(kernels):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 48, 33, generator=gen).to(DEVICE).transpose(1, 2)  # [2, 33, 48], non-contiguous
    size = torch.rand(2, 66, generator=gen).to(DEVICE)[:, ::2]
    target = torch.randint(0, 10, (2, 33), generator=gen).to(DEVICE)
    _check_merge_scatter(kernels, x, size, target, 10, atol=1e-5)
    new_x, new_size = kernels.merge_scatter_triton(x, torch.zeros_like(size), target, 10)
    assert (new_x == 0).all() and (new_size == 0).all()


def test_merge_scatter_matches_a_real_merge_plan(kernels):
    """Targets and weights from plan_merge itself (merged src share their dst's slot; padding)."""
    gen = torch.Generator().manual_seed(7)
    batch, length, hidden = 3, 33, 16
    x = torch.randn(batch, length, hidden, generator=gen)
    metric = torch.randn(batch, length, 8, generator=gen)
    size = torch.ones(batch, length)
    size[1, 25:] = 0.0
    source = torch.arange(length).expand(batch, -1).contiguous()
    capacity = token_merge.merged_capacity(length, 8, -1, "bipartite", False, 0, 1)
    target, weight = token_merge.plan_merge(metric, size, source, None, r=8, ratio_milli=-1, protect=[0],
                                            mode="bipartite", threshold=0.0, r_min_milli=0, fuse=False,
                                            capacity=capacity)
    _check_merge_scatter(kernels, x.to(DEVICE), weight.to(DEVICE), target.to(DEVICE), capacity, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dispatch_uses_the_kernels_on_cuda():
    gen = torch.Generator().manual_seed(8)
    _run_best_match(token_merge_triton, "cuda", 2, 1000, 64, torch.float16, atol=2e-3, tie=2e-3)
    _run_merge(token_merge_triton, "cuda", 4, 1000, 768, 600, torch.bfloat16, atol=1.6e-2)
    metric = torch.randn(2, 33, 32, generator=gen).cuda()
    is_src, is_dst = (m.cuda() for m in _roles(2, 33, gen))
    best, _ = token_merge.best_match(metric, is_src, is_dst)
    ref_best, _ = best_match_reference(metric, is_src, is_dst)
    torch.testing.assert_close(best, ref_best, atol=1e-5, rtol=0)
