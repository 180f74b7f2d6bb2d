"""The early-exit gate kernels against the torch references in ``dynasparse.kernels.exit_gate``.

On a machine without an NVIDIA GPU, tests/conftest.py sets ``TRITON_INTERPRET=1`` before anything imports
triton, so these run the kernels under Triton's interpreter on CPU tensors; on a GPU they run compiled.
The references themselves are checked against the textbook formulas (softmax, sort, -sum p log p).
"""
from __future__ import annotations

import math

import pytest
import torch

from dynasparse.kernels import exit_gate as eg
from dynasparse.kernels import exit_gate_triton as et

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _logits(gen: torch.Generator, rows: int, vocab: int, scale: float = 3.0,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.randn(rows, vocab, generator=gen) * scale).to(dtype).to(DEVICE)


def brute_force(logits: torch.Tensor) -> torch.Tensor:
    """The three scores straight from their definitions, in float64, one row at a time."""
    out = []
    for row in logits.double().cpu():
        p = torch.exp(row - row.max())
        p = p / p.sum()
        ranked = p.sort(descending=True).values.tolist()
        margin = ranked[0] - ranked[1] if len(ranked) > 1 else 0.0
        entropy = -sum(q * math.log(q) for q in p.tolist() if q > 0)
        confidence = 1.0 - entropy / math.log(len(ranked)) if len(ranked) > 1 else 1.0
        out.append([ranked[0], margin, confidence])
    return torch.tensor(out, dtype=torch.float32).T


def special_rows(vocab: int) -> torch.Tensor:
    """Rows with -inf entries (a third of them, and all but one), two equal maxima, and a peaked row."""
    gen = torch.Generator().manual_seed(vocab)
    rows = torch.randn(4, vocab, generator=gen)
    rows[0, torch.rand(vocab, generator=gen) < 0.3] = -math.inf
    rows[0, vocab // 2] = 0.5  # at least one finite value
    rows[1, :] = -math.inf
    rows[1, vocab - 1] = 1.0
    if vocab > 1:
        rows[2, 0] = rows[2, vocab - 1] = rows[2].max() + 1.0  # a tie, across blocks when V > BLOCK_V
    rows[3, vocab // 3] = 60.0
    return rows.to(DEVICE)


# --- the reference against the definitions ------------------------------------------------------------------

@pytest.mark.parametrize("vocab", [1, 2, 7, 100])
def test_reference_matches_the_definitions(vocab):
    gen = torch.Generator().manual_seed(vocab)
    for logits in (_logits(gen, 6, vocab), special_rows(vocab)):
        torch.testing.assert_close(eg.logit_confidence_reference(logits).cpu(), brute_force(logits),
                                   atol=1e-5, rtol=1e-5)


def test_reference_special_cases():
    ties = torch.tensor([[2.0, 2.0, 0.0], [5.0, -math.inf, -math.inf]], device=DEVICE)
    got = eg.logit_confidence_reference(ties)
    assert got.dtype == torch.float32 and got.shape == (3, 2)
    assert got[1, 0] == 0.0  # equal maxima: no margin
    torch.testing.assert_close(got[:, 1].cpu(), torch.ones(3))  # one finite value: certain
    single = eg.logit_confidence_reference(torch.tensor([[3.0], [-1.0]], device=DEVICE))
    torch.testing.assert_close(single.cpu(), torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]]))
    uniform = eg.logit_confidence_reference(torch.zeros(1, 8, device=DEVICE))
    torch.testing.assert_close(uniform.cpu(), torch.tensor([[0.125], [0.0], [0.0]]))


# --- the Triton kernel against the reference ----------------------------------------------------------------

@pytest.mark.parametrize("vocab", [1, 7, 100, 3000, 5000])
@pytest.mark.parametrize("rows", [1, 5])
def test_logit_confidence_kernel_fp32(vocab, rows):
    gen = torch.Generator().manual_seed(vocab * 10 + rows)
    logits = _logits(gen, rows, vocab)
    torch.testing.assert_close(et.logit_confidence_triton(logits), eg.logit_confidence_reference(logits),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vocab", [7, 5000])
def test_logit_confidence_kernel_half_inputs(dtype, vocab):
    gen = torch.Generator().manual_seed(vocab)
    logits = _logits(gen, 5, vocab, dtype=dtype)
    got = et.logit_confidence_triton(logits)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, eg.logit_confidence_reference(logits.float()), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("vocab", [1, 7, 100, 5000])
def test_logit_confidence_kernel_special_rows(vocab):
    logits = special_rows(vocab)
    got = et.logit_confidence_triton(logits)
    torch.testing.assert_close(got, eg.logit_confidence_reference(logits), atol=1e-5, rtol=1e-5)
    assert not got.isnan().any()
    one_finite = torch.tensor([1.0, 1.0 if vocab > 1 else 0.0, 1.0])  # certain; V == 1 has no margin
    torch.testing.assert_close(got[:, 1].cpu(), one_finite)
    if vocab > 1:
        assert got[1, 2] == 0.0  # equal maxima, possibly in different blocks
        assert got[0, 3] > 0.999 and got[2, 3] > 0.99  # peaked


def test_logit_confidence_kernel_strided_rows():
    gen = torch.Generator().manual_seed(3)
    wide = _logits(gen, 4, 300)
    logits = wide[:, :200]  # row stride 300, unit column stride
    torch.testing.assert_close(et.logit_confidence_triton(logits), eg.logit_confidence_reference(logits),
                               atol=1e-5, rtol=1e-5)
    assert et.logit_confidence_triton(wide[:0]).shape == (3, 0)


@pytest.mark.parametrize("shape", [(2, 3, 50), (1, 1, 7), (4, 9)])
def test_logit_confidence_any_leading_shape(shape):
    gen = torch.Generator().manual_seed(len(shape))
    logits = (torch.randn(*shape, generator=gen) * 2).to(DEVICE)
    got = eg.logit_confidence(logits)
    assert got.shape == (3, *shape[:-1]) and got.dtype == torch.float32
    flat = eg.logit_confidence_reference(logits.reshape(-1, shape[-1]))
    torch.testing.assert_close(got, flat.reshape(3, *shape[:-1]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(et.logit_confidence_triton(logits.reshape(-1, shape[-1])).reshape(got.shape), got,
                               atol=1e-5, rtol=1e-5)


# --- compact rows ---------------------------------------------------------------------------------------------

def _rows(gen: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.bool:
        return (torch.rand(*shape, generator=gen) < 0.5).to(DEVICE)
    if dtype == torch.int64:
        return torch.randint(-1000, 1000, shape, generator=gen).to(DEVICE)
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


INDICES = [[4, 0, 5], [], [2, 2, 0, 2], [0, 1, 2, 3, 4, 5]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64, torch.bool])
@pytest.mark.parametrize("shape", [(6,), (6, 5), (6, 3, 4)])
def test_compact_rows_kernel(shape, dtype):
    gen = torch.Generator().manual_seed(len(shape))
    x = _rows(gen, shape, dtype)
    for rows in INDICES:
        index = torch.tensor(rows, dtype=torch.long, device=DEVICE)
        got = et.compact_rows_triton(x, index)
        assert got.dtype == dtype and got.shape == (len(rows), *shape[1:])
        assert torch.equal(got, x.index_select(0, index))
        assert torch.equal(eg.compact_rows(x, index), x.index_select(0, index))


def test_compact_rows_kernel_wide_and_strided_rows():
    gen = torch.Generator().manual_seed(1)
    x = _rows(gen, (5, 3000), torch.float32)  # several column blocks per row
    index = torch.tensor([3, 1, 3], device=DEVICE)
    assert torch.equal(et.compact_rows_triton(x, index), x.index_select(0, index))
    transposed = _rows(gen, (4, 6), torch.float32).T  # not contiguous: copied first
    assert torch.equal(et.compact_rows_triton(transposed, index), transposed.index_select(0, index))


# --- dispatch -------------------------------------------------------------------------------------------------

def test_cpu_tensors_use_the_references(monkeypatch):
    def fail(*args):
        raise AssertionError("CPU tensors must not reach the Triton kernels")

    monkeypatch.setattr(et, "logit_confidence_triton", fail)
    monkeypatch.setattr(et, "compact_rows_triton", fail)
    logits = torch.randn(2, 3, 11)
    torch.testing.assert_close(eg.logit_confidence(logits),
                               eg.logit_confidence_reference(logits.reshape(6, 11)).reshape(3, 2, 3))
    index = torch.tensor([1, 0])
    assert torch.equal(eg.compact_rows(logits, index), logits[[1, 0]])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_tensors_dispatch_to_the_kernels(monkeypatch):
    calls = []

    def spy(name):
        original = getattr(et, name)

        def wrapped(*args):
            calls.append(name)
            return original(*args)
        return wrapped

    for name in ("logit_confidence_triton", "compact_rows_triton"):
        monkeypatch.setattr(et, name, spy(name))
    logits = torch.randn(2, 3, 5000, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(eg.logit_confidence(logits),
                               eg.logit_confidence_reference(logits.reshape(6, -1)).reshape(3, 2, 3),
                               atol=1e-5, rtol=1e-5)
    index = torch.tensor([2, 0, 0], device="cuda")
    x = torch.randn(4, 3, 7, device="cuda")
    assert torch.equal(eg.compact_rows(x, index), x.index_select(0, index))
    assert torch.equal(eg.compact_rows(x.transpose(1, 2), index), x.transpose(1, 2).index_select(0, index))
    assert calls == ["logit_confidence_triton", "compact_rows_triton"]  # the strided x went to index_select
