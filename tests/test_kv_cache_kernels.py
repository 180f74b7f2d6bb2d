"""The Triton KV-cache decode kernels against the torch reference in ``dynasparse.kernels.kv_cache``.

On a machine without an NVIDIA GPU, tests/conftest.py sets ``TRITON_INTERPRET=1`` before anything imports
triton, so these run the kernels under Triton's interpreter on CPU tensors; on a GPU they run compiled.
Caches are compared as contents (slots sorted by position): slot order is meaningless, and the kernel and
torch's topk may pick different slots among equal priorities.
"""
from __future__ import annotations

import pytest
import torch

from dynasparse.kernels import kv_cache as kc
from dynasparse.kernels import kv_cache_triton as kt
from dynasparse.kernels.policies import POLICIES

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


def random_cache(gen: torch.Generator, batch: int, kv_heads: int, capacity: int, dim: int, dim_v: int,
                 dtype: torch.dtype = torch.float32, empty: float = 0.3, seen: int = 100) -> dict[str, torch.Tensor]:
    """Distinct positions below ``seen`` (a share of them empty), distinct scores, an empty scratch slot."""
    slots = capacity + 1
    positions = torch.stack([torch.randperm(seen, generator=gen)[:slots] for _ in range(batch * kv_heads)])
    positions = positions.reshape(batch, kv_heads, slots)
    positions[torch.rand(batch, kv_heads, slots, generator=gen) < empty] = -1
    positions[..., -1] = -1
    scores = torch.randperm(batch * kv_heads * slots, generator=gen).float().reshape(batch, kv_heads, slots)
    return {"keys": _randn(gen, batch, kv_heads, slots, dim, dtype=dtype),
            "values": _randn(gen, batch, kv_heads, slots, dim_v, dtype=dtype),
            "positions": positions.to(DEVICE), "scores": scores.to(DEVICE),
            "seen": torch.full((batch,), seen, dtype=torch.long, device=DEVICE)}


def assert_same_contents(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                         score_atol: float = 0.0) -> None:
    """Same tokens (position, key, value, score) in every (row, head), wherever they sit; scratch empty."""
    def canonical(state):
        order = state["positions"].argsort(-1)
        positions = state["positions"].gather(-1, order)
        valid = positions >= 0
        pick = lambda t: (t.gather(2, order[..., None].expand_as(t)).float() * valid[..., None])  # noqa: E731
        return positions, pick(state["keys"]), pick(state["values"]), state["scores"].gather(-1, order) * valid

    (pos_a, keys_a, values_a, scores_a), (pos_e, keys_e, values_e, scores_e) = canonical(actual), canonical(expected)
    assert torch.equal(pos_a, pos_e)
    assert torch.equal(keys_a, keys_e) and torch.equal(values_a, values_e)
    torch.testing.assert_close(scores_a, scores_e, atol=score_atol, rtol=0)
    assert torch.equal(actual["seen"], expected["seen"])
    assert (actual["positions"][..., -1] == -1).all()


# --- attention over the cache, with masses ---------------------------------------------------------------

def new_key_masks(batch: int, q_heads: int) -> list[torch.Tensor | None]:
    """No mask, row 1's new token padding (bool), the same as an additive mask, and per-head masking."""
    padding = torch.ones(batch, 1, 1, 1, dtype=torch.bool, device=DEVICE)
    padding[1] = False
    additive = torch.zeros(batch, 1, 1, 1, device=DEVICE).masked_fill(~padding, torch.finfo(torch.float32).min)
    per_head = torch.ones(batch, q_heads, 1, 1, dtype=torch.bool, device=DEVICE)
    per_head[0, ::2] = False
    return [None, padding, additive, per_head]


def check_decode_attention(groups: int, dim: int, dim_v: int, capacity: int, dtype: torch.dtype, atol: float,
                           seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    batch, kv_heads = 2, 2
    q_heads = groups * kv_heads
    state = random_cache(gen, batch, kv_heads, capacity, dim, dim_v, dtype)
    state["positions"][1, 0] = -1  # an empty cache: only the new token (if real) is attended
    q = _randn(gen, batch, q_heads, 1, dim, dtype=dtype)
    k, v = _randn(gen, batch, kv_heads, 1, dim, dtype=dtype), _randn(gen, batch, kv_heads, 1, dim_v, dtype=dtype)
    observed = torch.tensor([0.7, 1.0], device=DEVICE)
    cache = (state["keys"], state["values"], state["positions"])
    for mask in new_key_masks(batch, q_heads):
        expected = kc.cache_attention_reference(q, k, v, mask, True, None, *cache, observed[:, None])
        bias = kt._new_key_bias(mask, batch, q_heads, q.device)
        out, mass, mass_new = kt.decode_attention_with_mass(q, k, v, bias, *cache, None, observed)
        assert out.shape == (batch, 1, q_heads, dim_v) and out.dtype == dtype
        torch.testing.assert_close(out.float(), expected[0].float(), atol=atol, rtol=0)
        torch.testing.assert_close(mass, expected[1], atol=atol, rtol=0)
        torch.testing.assert_close(mass_new, expected[2], atol=atol, rtol=0)
        assert kt.decode_attention_with_mass(q, k, v, bias, *cache, None, None)[1:] == (None, None)


# (query heads per kv head, head dim, value dim, capacity): D power of two or not, one or two K/V blocks
@pytest.mark.parametrize("groups, dim, dim_v, capacity",
                         [(1, 16, 16, 8), (2, 32, 32, 12), (4, 64, 64, 12), (2, 24, 24, 70), (4, 24, 20, 9)])
def test_decode_attention_and_masses_match_the_reference(groups, dim, dim_v, capacity):
    check_decode_attention(groups, dim, dim_v, capacity, torch.float32, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_attention_half_precision(dtype):
    check_decode_attention(2, 24, 32, 20, dtype, atol=2e-2)


# --- evict + write ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("empty, padding, arrival_lowest, sink, recent", [
    (0.0, False, False, 0, 0),  # a full cache: the lowest-scored slot leaves
    (0.4, False, False, 1, 2),  # empty slots are taken first
    (0.0, True, False, 1, 2),  # a padding token never takes a slot
    (0.3, True, False, 0, 0),
    (0.0, False, True, 0, 0),  # the new token is the lowest: dropped on arrival, into the scratch slot
    (0.0, False, True, 0, 1),  # ... unless the recent window protects it
    (0.0, False, False, 4, 6),  # the lowest scores sit on sinks and recent tokens, which stay
])
def test_evict_and_write_one_matches_the_reference(empty, padding, arrival_lowest, sink, recent):
    gen = torch.Generator().manual_seed(1)
    batch, kv_heads, capacity, dim, dim_v = 2, 3, 10, 12, 8
    seen = 16
    expected = random_cache(gen, batch, kv_heads, capacity, dim, dim_v, empty=empty, seen=seen)
    if sink or recent:  # the protected positions get the lowest scores
        protected = (expected["positions"] >= 0) & ((expected["positions"] < sink)
                                                    | (expected["positions"] >= seen + 1 - recent))
        expected["scores"] -= protected * 1e4
    actual = {name: t.clone() for name, t in expected.items()}
    new_k, new_v = _randn(gen, batch, kv_heads, 1, dim), _randn(gen, batch, kv_heads, 1, dim_v)
    real = torch.tensor([not padding, True], device=DEVICE)
    new_pos = torch.where(real, expected["seen"], -1)[:, None]
    seen_after = expected["seen"] + real.long()
    cache_scores = expected["scores"] + torch.rand(batch, kv_heads, capacity + 1, generator=gen).to(DEVICE)
    new_score = torch.full((batch, kv_heads, 1), -1e6 if arrival_lowest else 1e6, device=DEVICE)
    for state, write in ((expected, kc.evict_and_write), (actual, kt.evict_and_write_one)):
        write(state["keys"], state["values"], state["positions"], state["scores"], new_k, new_v, new_pos,
              cache_scores, new_score, seen_after, sink, recent)
    assert_same_contents(actual, expected)


def test_evict_ties_drop_the_lowest_slot_and_keep_the_new_token():
    gen = torch.Generator().manual_seed(2)
    state = random_cache(gen, 1, 1, 6, 16, 16, empty=0.0, seen=20)
    positions = state["positions"].clone()
    new_k, new_v = _randn(gen, 1, 1, 1, 16), _randn(gen, 1, 1, 1, 16)
    kt.evict_and_write_one(state["keys"], state["values"], state["positions"], state["scores"], new_k, new_v,
                           torch.tensor([20], device=DEVICE), torch.zeros_like(state["scores"]),
                           torch.zeros(1, 1, 1, device=DEVICE), torch.tensor([21], device=DEVICE), 0, 0)
    assert state["positions"][0, 0, 0] == 20 and torch.equal(state["positions"][0, 0, 1:], positions[0, 0, 1:])
    assert torch.equal(state["keys"][0, 0, 0], new_k[0, 0, 0])


# --- the whole decode step, step after step --------------------------------------------------------------

SUMMED = sorted(name for name, rule in POLICIES.items() if rule.reduce == "sum")  # the Triton kernel sums masses


@pytest.mark.parametrize("policy", SUMMED)
def test_decode_step_matches_the_reference_step_after_step(policy):
    gen = torch.Generator().manual_seed(3)
    batch, q_heads, kv_heads, dim, capacity, prompt = 2, 4, 2, 16, 12, 10
    sink, recent, window, pool = 1, 2, 4, 3
    expected = kc.empty_state(batch, kv_heads, capacity, dim, dim, torch.float32, DEVICE)
    mask = torch.ones(batch, 1, 1, prompt, dtype=torch.bool, device=DEVICE)
    mask[1, ..., :3] = False  # row 1 is left-padded
    q, k, v = (_randn(gen, batch, heads, prompt, dim) for heads in (q_heads, kv_heads, kv_heads))
    kc.kv_cache_step_reference(q, k, v, mask, True, None, *expected.values(), policy, sink, recent, window, pool)
    actual = {name: t.clone() for name, t in expected.items()}
    for step in range(20):
        step_mask = None
        if step == 6:  # row 1 has a padding token (a finished sequence)
            step_mask = torch.tensor([True, False], device=DEVICE)[:, None, None, None]
        q, k, v = (_randn(gen, batch, heads, 1, dim) for heads in (q_heads, kv_heads, kv_heads))
        reference = kc.kv_cache_step_reference(q, k, v, step_mask, True, None, *expected.values(), policy, sink,
                                               recent, window, pool)
        out = kt.kv_cache_decode_step(q, k, v, step_mask, True, None, *actual.values(), policy, sink, recent)
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)
        assert_same_contents(actual, expected, score_atol=1e-5)
    assert (expected["seen"] == torch.tensor([prompt + 20, prompt - 3 + 19], device=DEVICE)).all()


def test_the_triton_decode_step_refuses_a_policy_that_takes_the_max():
    q = torch.zeros(1, 2, 1, 8, device=DEVICE)
    state = kc.empty_state(1, 1, 4, 8, 8, torch.float32, DEVICE)
    with pytest.raises(ValueError, match="kv_cache_step"):
        kt.kv_cache_decode_step(q, q[:, :1], q[:, :1], None, True, None, *state.values(), "kvzip", 1, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_op_dispatches_decode_to_the_kernels_on_cuda(monkeypatch):
    from dynasparse.ir import ops

    calls = []
    step = kt.kv_cache_decode_step
    monkeypatch.setattr(kt, "kv_cache_decode_step", lambda *args: calls.append(1) or step(*args))
    gen = torch.Generator().manual_seed(4)
    expected = random_cache(gen, 2, 2, 64, 128, 128, torch.bfloat16)
    expected["scores"] /= expected["scores"].max()
    actual = {name: t.clone() for name, t in expected.items()}
    q, k, v = _randn(gen, 2, 8, 1, 128, dtype=torch.bfloat16), *(_randn(gen, 2, 2, 1, 128, dtype=torch.bfloat16)
                                                                  for _ in range(2))
    reference = kc.kv_cache_step_reference(q, k, v, None, True, None, *expected.values(), "h2o", 4, 8, 1, 1)
    out = ops.kv_cache_attention(q, k, v, None, True, None, *actual.values(), "h2o", 4, 8, 1, 1)
    assert calls
    torch.testing.assert_close(out.float(), reference.float(), atol=2e-2, rtol=0)
    torch.testing.assert_close(actual["positions"].sort(-1).values, expected["positions"].sort(-1).values)


# --- the torch step that runs on CPU (append fast paths) against the reference ----------------------------

def _chunk_mask(kind: str, key_valid: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
    """A site mask for new tokens with ``key_valid`` [B, T] real keys: what Hugging Face hands over (bool,
    causal folded in), an additive one, or none at all with is_causal."""
    batch, length = key_valid.shape
    if kind == "none":
        return None, True
    causal = torch.ones(length, length, dtype=torch.bool, device=DEVICE).tril()
    allowed = (causal & key_valid[:, None, None, :]).expand(batch, 1, length, length)
    if kind == "bool":
        return allowed, False
    return torch.zeros(allowed.shape, device=DEVICE).masked_fill(~allowed, torch.finfo(torch.float32).min), False


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("kind", ["none", "bool", "additive"])
def test_torch_step_matches_the_reference_through_fill_and_eviction(policy, padded, kind):
    """Chunks, then decode steps, into a cache of 12 slots: the append paths (rows alike or not) while it
    fills, then eviction; outputs and contents (scores included) equal the reference's at every step."""
    if kind == "none" and padded:
        pytest.skip("padding needs a mask")
    gen = torch.Generator().manual_seed(5)
    batch, q_heads, kv_heads, dim, capacity = 2, 4, 2, 16, 12
    expected = kc.empty_state(batch, kv_heads, capacity, dim, dim, torch.float32, DEVICE)
    actual = {name: t.clone() for name, t in expected.items()}
    for step, length in enumerate([5, 4, 1, 1, 3, 1, 1, 1, 1]):
        key_valid = torch.ones(batch, length, dtype=torch.bool, device=DEVICE)
        if padded and step < 2:
            key_valid[1, :2] = False  # row 1's prompt is left-padded
        mask, is_causal = _chunk_mask(kind, key_valid)
        q, k, v = (_randn(gen, batch, heads, length, dim) for heads in (q_heads, kv_heads, kv_heads))
        reference = kc.kv_cache_step_reference(q, k, v, mask, is_causal, None, *expected.values(), policy, 1, 2, 3, 3)
        out = kc.kv_cache_step(q, k, v, mask, is_causal, None, *actual.values(), policy, 1, 2, 3, 3)
        real = key_valid.any(0)  # padding queries' outputs are not compared: the site decides them
        torch.testing.assert_close(out[:, real], reference[:, real], atol=1e-5, rtol=0)
        assert_same_contents(actual, expected, score_atol=1e-5)


def test_torch_step_keeps_an_unevicted_cache_in_position_order():
    gen = torch.Generator().manual_seed(6)
    state = kc.empty_state(2, 2, 16, 8, 8, torch.float32, DEVICE)
    key_valid = torch.tensor([[True] * 6, [False, False] + [True] * 4], device=DEVICE)
    mask, _ = _chunk_mask("bool", key_valid)
    q, k, v = _randn(gen, 2, 4, 6, 8), _randn(gen, 2, 2, 6, 8), _randn(gen, 2, 2, 6, 8)
    kc.kv_cache_step(q, k, v, mask, False, None, *state.values(), "h2o", 1, 2, 3, 3)
    slots = torch.arange(17, device=DEVICE)
    seen = state["seen"][:, None, None]
    expected = torch.where(slots < seen, slots, torch.full_like(slots, -1))
    assert torch.equal(state["positions"], expected.expand_as(state["positions"]))


# --- sparse prefill over the cache (issue 14's composition) against the reference ------------------------------

@pytest.mark.parametrize("policy", ["h2o", "snapkv", "tova", "streaming"])
def test_sparse_step_keeping_every_block_is_the_reference_step(policy):
    """A plan that keeps every block reads what the dense step reads: same output, same masses, same
    evictions, from a cache with holes and slots out of position order."""
    from dynasparse.kernels.kv_cache_sparse import kv_cache_sparse_step

    gen = torch.Generator().manual_seed(7)
    expected = random_cache(gen, 2, 2, 48, 16, 16, seen=100)
    expected["scores"] /= expected["scores"].max()
    actual = {name: t.clone() for name, t in expected.items()}
    q = _randn(gen, 2, 4, 40, 16)
    k, v = _randn(gen, 2, 2, 40, 16), _randn(gen, 2, 2, 40, 16)
    reference = kc.kv_cache_step_reference(q, k, v, None, True, None, *expected.values(), policy, 4, 8, 8, 1)
    out = kv_cache_sparse_step(q, k, v, None, True, None, *actual.values(), policy, 4, 8, 8, 1,
                               16, "pooled", "keep_ratio", 1.0, 1, 1, 0, 16, 1.0)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)
    assert_same_contents(actual, expected, score_atol=1e-5)


def _full_cache_and_a_chunk() -> tuple[dict, dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cache, a copy of it, q, k, v): 96 full slots of 100 tokens seen, and a 64-token chunk."""
    gen = torch.Generator().manual_seed(8)
    expected = random_cache(gen, 1, 2, 96, 16, 16, empty=0.0, seen=100)
    actual = {name: t.clone() for name, t in expected.items()}
    return expected, actual, _randn(gen, 1, 4, 64, 16), _randn(gen, 1, 2, 64, 16), _randn(gen, 1, 2, 64, 16)


def test_sparse_step_with_a_sparse_plan_reads_fewer_keys():
    from dynasparse.kernels.kv_cache_sparse import kv_cache_sparse_step

    expected, actual, q, k, v = _full_cache_and_a_chunk()
    dense = kc.kv_cache_step_reference(q, k, v, None, True, None, *expected.values(), "h2o", 4, 8, 8, 1)
    sparse = kv_cache_sparse_step(q, k, v, None, True, None, *actual.values(), "h2o", 4, 8, 8, 1,
                                  16, "pooled", "keep_ratio", 0.25, 1, 1, 0, 16, 1.0)
    assert not torch.allclose(sparse, dense, atol=1e-3)
    assert (actual["positions"][..., :-1] >= 0).all()  # still a full cache of the budget after eviction


# --- KVzip's two readings of the prompt ---------------------------------------------------------------------------

@pytest.mark.parametrize("reduce", ["max", "sum"])
@pytest.mark.parametrize("tail", [6, 2])
def test_masses_from_the_log_normaliser_equal_the_softmax_masses(reduce, tail):
    """The re-read's masses come from the flash call's log-sum-exp, a few query rows at a time: the same
    masses as a softmax over every logit, for the last ``tail`` queries of a chunk."""
    gen = torch.Generator().manual_seed(9)
    batch, q_heads, kv_heads, dim, cached, length = 2, 4, 2, 16, 20, 6
    q, k, v = _randn(gen, batch, q_heads, length, dim), _randn(gen, batch, kv_heads, length, dim), \
        _randn(gen, batch, kv_heads, length, dim)
    keys, values = _randn(gen, batch, kv_heads, cached, dim), _randn(gen, batch, kv_heads, cached, dim)
    _, lse = kc._cached_then_causal(q, keys, values, k, v, None)
    every = torch.cat([keys, k], 2)
    rule = POLICIES["kvzip" if reduce == "max" else "h2o"]
    visible = kc.causal_mask(length, cached + length, q.device)[length - tail:]
    expected = kc._slot_masses(q[:, :, -tail:], every, visible, None, q.new_ones(batch, tail), rule)
    actual = kc._masses_by_lse(q[:, :, -tail:], every, lse[..., -tail:], None, reduce, rows=5)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_the_prompts_first_reading_computes_no_masses():
    """Under ``prompt_phase("read")`` a KVzip cache attends as usual but scores nothing: the re-read will."""
    from dynasparse.kernels.prompt_phase import prompt_phase

    gen = torch.Generator().manual_seed(10)
    plain = kc.empty_state(1, 2, 24, 16, 16, torch.float32, DEVICE)
    skipped = {name: t.clone() for name, t in plain.items()}
    for length in (8, 8):
        q, k, v = _randn(gen, 1, 4, length, 16), _randn(gen, 1, 2, length, 16), _randn(gen, 1, 2, length, 16)
        expected = kc.kv_cache_step(q, k, v, None, True, None, *plain.values(), "kvzip", 1, 2, 3, 3)
        with prompt_phase("read"):
            out = kc.kv_cache_step(q, k, v, None, True, None, *skipped.values(), "kvzip", 1, 2, 3, 3)
        torch.testing.assert_close(out, expected)
    assert bool((plain["scores"][..., :16] > 0).all()) and not bool(skipped["scores"].any())
    assert torch.equal(skipped["keys"], plain["keys"])


def test_a_sparse_site_rereading_the_prompt_reads_every_key():
    """The re-read scores what every key is paid, so a sparse site reads densely under ``prompt_phase("reread")``."""
    from dynasparse.kernels.kv_cache_sparse import kv_cache_sparse_step
    from dynasparse.kernels.prompt_phase import prompt_phase

    expected, actual, q, k, v = _full_cache_and_a_chunk()
    dense = kc.kv_cache_step(q, k, v, None, True, None, *expected.values(), "kvzip", 4, 8, 8, 1)
    with prompt_phase("reread"):
        sparse = kv_cache_sparse_step(q, k, v, None, True, None, *actual.values(), "kvzip", 4, 8, 8, 1,
                                      16, "pooled", "keep_ratio", 0.25, 1, 1, 0, 16, 1.0)
    torch.testing.assert_close(sparse, dense)
    assert_same_contents(actual, expected)
