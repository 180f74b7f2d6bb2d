"""The compressed tier of the KV cache (KIVI codes, block spills, query-aware block reads): the codes stay
within their stated error bound, a spilled block reads back as what left, the budget counts every byte,
and bad settings get clear errors. Identity, batching, composition and opcheck come from the
``kv-int4-tier`` entry of ``default_configs.DEFAULTS``; the compiled tier from ``test_kv_memory.py``."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import dynasparse
from dynasparse.errors import DynasparseError
from dynasparse.kernels import kv_tier, kv_tier_cpu, quantize
from dynasparse.kernels.kv_cache import empty_state

from default_configs import decoder_prompts, llama


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from(quantize.BITS), group=st.sampled_from([4, 8, 16]), seed=st.integers(0, 1000),
       spread=st.floats(0.01, 100.0))
def test_codes_dequantize_within_their_bound(bits, group, seed, spread):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, 3, group, 16, generator=generator) * spread + 5.0
    values = torch.randn(2, 3, group, 16, generator=generator) * spread
    packed, scale, low = quantize.quantize_keys(keys, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == 16 * bits // 8
    error = (quantize.dequantize_keys(packed, scale, low, bits) - keys).abs()
    assert (error <= quantize.error_bound(scale, low, bits)[..., None, :]).all()
    packed, scale, low = quantize.quantize_values(values, bits, group)
    error = (quantize.dequantize_values(packed, scale, low, bits, group) - values).abs()
    bound = quantize.error_bound(scale, low, bits).repeat_interleave(group, -1)
    assert (error <= bound).all()


def test_codes_of_a_constant_block_are_exact():
    keys = torch.full((1, 1, 8, 16), 3.0)
    assert torch.equal(quantize.dequantize_keys(*quantize.quantize_keys(keys, 4), 4), keys)


def test_unsupported_bits_or_group_say_what_to_use():
    with pytest.raises(ValueError, match=r"\[2, 4, 8\]"):
        quantize.check(3, 32)
    with pytest.raises(ValueError, match="must divide the head dimensions"):
        quantize.check(4, 24, 64)
    with pytest.raises(DynasparseError, match="tier_bits"):
        dynasparse.KVEvictionConfig(tier_bits=3)
    with pytest.raises(DynasparseError, match="every_chunk|after_prefill"):
        dynasparse.KVEvictionConfig(tier_bits=4, compress="every_chunk")
    with pytest.raises(DynasparseError, match="head dimensions"):  # llama()'s heads are 16 wide
        dynasparse.optimize(llama(), dynasparse.KVEvictionConfig(tier_bits=4, tier_group=32),
                            example_kwargs={"input_ids": torch.ones(1, 8, dtype=torch.long)})


def _filled(batch=2, heads=2, tokens=40, dim=16, group=8, blocks=3):
    """A hot cache holding ``tokens`` tokens (slot == position) and an empty tier of ``blocks`` blocks."""
    torch.manual_seed(0)
    hot = empty_state(batch, heads, tokens, dim, dim, torch.float32)
    hot["keys"][:, :, :tokens] = torch.randn(batch, heads, tokens, dim)
    hot["values"][:, :, :tokens] = torch.randn(batch, heads, tokens, dim)
    hot["positions"][:, :, :tokens] = torch.arange(tokens)
    hot["scores"][:, :, :tokens] = torch.rand(batch, heads, tokens)
    hot["seen"].fill_(tokens)
    return hot, kv_tier.empty_tier(batch, heads, blocks, dim, dim, 4, group)


def test_a_spill_moves_the_oldest_blocks_and_keeps_the_best_scored():
    hot, tier = _filled()
    original = {name: tensor.clone() for name, tensor in hot.items()}
    kv_tier.spill(hot, tier, 4, sink=2, recent=4, horizon=hot["seen"])
    # 34 spillable tokens (positions 2..35) make 4 full blocks of 8; the tier keeps the 3 best scored
    left = (original["positions"] >= 0) & (hot["positions"] < 0)
    assert left.sum(-1).eq(32).all()  # 4 blocks left the hot slots (one was dropped)
    assert hot["positions"][..., :2].eq(torch.arange(2)).all()  # the sinks stay
    assert hot["positions"][..., 34:40].ge(0).all()  # so do the recent window and the partial block
    block_scores = original["scores"][..., 2:34].reshape(2, 2, 4, 8).amax(-1)
    kept = torch.sort(tier["cold_scores"], -1).values
    assert torch.equal(kept, torch.sort(block_scores, -1).values[..., 1:])
    # every kept token reads back within the bound of what it was
    keys = quantize.dequantize_keys(tier["cold_keys"], tier["cold_key_scale"], tier["cold_key_min"], 4).flatten(2, 3)
    positions = tier["cold_positions"].long().flatten(2)
    expected = original["keys"].gather(2, positions[..., None].expand(-1, -1, -1, 16))
    bound = quantize.error_bound(tier["cold_key_scale"], tier["cold_key_min"], 4).repeat_interleave(8, 2)
    assert ((keys - expected).abs() <= bound).all()


def test_pinned_tokens_stay_in_full_precision_under_a_policy_that_rescores():
    """The spare bytes of a budget pin the highest-scored tokens past the sinks and the recent window: no spill
    moves them, and a decode step keeps them pinned even under TOVA, which rescores every token each step."""
    hot, tier = _filled(batch=1)
    best = hot["scores"][..., 2:36].topk(5, -1).indices + 2  # slot == position
    kv_tier.pin(hot, 5, sink=2, recent=4, horizon=hot["seen"])
    assert torch.equal(hot["scores"].isposinf().nonzero()[:, -1].sort().values, best.flatten().sort().values)
    kv_tier.spill(hot, tier, 4, sink=2, recent=4, horizon=hot["seen"])
    assert hot["positions"].gather(2, best).eq(best).all()  # 29 spillable tokens: 3 blocks left, the pins stayed
    assert (hot["positions"] >= 0).sum(-1).eq(2 + 5 + 5 + 4).all()  # sinks, pins, a partial block, recent
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, heads, 1, 16, generator=gen) for heads in (4, 2, 2))
    kv_tier.tiered_step(None, q, k, v, None, True, 0.25, list(hot.values()), list(tier.values()), "tova", 2, 4, 1, 1,
                        4, 1.0)
    assert hot["scores"].gather(2, best).isposinf().all() and hot["positions"].gather(2, best).eq(best).all()


def test_query_aware_reads_the_block_its_query_points_at():
    hot, tier = _filled(batch=1, heads=1, blocks=4)
    hot["keys"][0, 0, 10] = 40.0  # one token's key is far out along every channel
    kv_tier.spill(hot, tier, 4, sink=2, recent=4, horizon=hot["seen"])
    query = torch.ones(1, 1, 1, 16)
    chosen = kv_tier._chosen_blocks(query, tier, 4, 0.25)  # 1 of 4 blocks
    assert chosen.shape[-1] == 1 and 10 in tier["cold_positions"][0, 0, chosen.flatten()].flatten().tolist()


@pytest.mark.parametrize("policy", ["kvzip", "h2o", "snapkv", "streaming"])
def test_a_decode_step_over_the_tier_is_the_general_step(policy):
    """One real token per row takes the decode path (no ranking for an eviction that cannot happen): the
    same output, scores and slots as the general path (``cache_attention_reference`` + ``score_and_write``)."""
    from dynasparse.kernels.kv_cache import cache_attention_reference, score_and_write
    from dynasparse.kernels.policies import POLICIES

    hot, tier = _filled(tokens=40)
    kv_tier.spill(hot, tier, 4, sink=2, recent=4, horizon=hot["seen"])  # room in the hot slots, a full tier
    fast = {name: tensor.clone() for name, tensor in hot.items()}
    gen = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(2, 4, 1, 16, generator=gen), torch.randn(2, 2, 1, 16, generator=gen), \
        torch.randn(2, 2, 1, 16, generator=gen)
    rule, held, observed = POLICIES[policy], 40, torch.ones(2, 1)
    cold = kv_tier.tier_attention_reference(q.reshape(2, 2, 2, 16), tier, torch.arange(3).expand(2, 2, 3), 4, 0.25)
    expected = cache_attention_reference(q, k, v, None, True, 0.25, hot["keys"][:, :, :held], hot["values"][:, :, :held],
                                         hot["positions"][..., :held], observed if rule.uses_attention else None,
                                         rule, cold)
    masses = None if expected[1] is None else torch.cat([expected[1], expected[2]], -1)
    score_and_write(q, k, v, *hot.values(), torch.ones(2, 1, dtype=torch.bool), rule, masses, observed, held, 2, 4,
                    0.25, 1)
    actual = kv_tier._attend_one(q, k, v, fast["keys"][:, :, :held], fast["values"][:, :, :held],
                                 fast["positions"][..., :held], cold, 0.25, rule)
    kv_tier._write_one(q, k, v, *fast.values(), rule, actual[1], actual[2], observed, held, 0.25, 1)
    for got, want in zip(actual, expected):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    held_now = hot["positions"] >= 0  # what an empty slot scores does not matter
    for name in hot:
        torch.testing.assert_close(fast[name].masked_fill(~held_now, 0) if name == "scores" else fast[name],
                                   hot[name].masked_fill(~held_now, 0) if name == "scores" else hot[name],
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_the_cpu_kernel_attends_over_the_tier_as_the_reference(bits):
    """The C++ kernels give the references' results: attention over the chosen blocks (a block at a time,
    online softmax, a head's blocks split over threads; empty slots and blocks skipped, a head with nothing
    gives 0 and -inf), and each block's logit bound."""
    if not kv_tier_cpu.usable(torch.zeros(1)):
        pytest.skip("the C++ kernel did not build here")
    gen = torch.Generator().manual_seed(3)
    batch, heads, blocks, group, dim, rows = 2, 3, 40, 8, 16, 5
    tier = kv_tier.empty_tier(batch, heads, blocks, dim, dim, bits, group)
    keys, values = torch.randn(batch, heads, blocks, group, dim, generator=gen), \
        torch.randn(batch, heads, blocks, group, dim, generator=gen)
    tier["cold_keys"][:], tier["cold_key_scale"][:], tier["cold_key_min"][:] = quantize.quantize_keys(keys, bits)
    tier["cold_values"][:], tier["cold_value_scale"][:], tier["cold_value_min"][:] = \
        quantize.quantize_values(values, bits, group)
    positions = torch.arange(blocks * group, dtype=torch.int32).reshape(blocks, group)
    tier["cold_positions"][:] = positions.masked_fill(torch.rand(blocks, group, generator=gen) < 0.2, -1)
    tier["cold_positions"][:, :, 5] = -1  # an empty block
    tier["cold_positions"][1, 2] = -1  # a head that holds nothing
    q = torch.randn(batch, heads, rows, dim, generator=gen)
    for chosen in (torch.arange(blocks).expand(batch, heads, blocks), torch.randperm(blocks, generator=gen)[:33]
                   .expand(batch, heads, 33), torch.tensor([5, 7]).expand(batch, heads, 2)):
        expected = kv_tier.tier_attention_reference(q, tier, chosen, bits, 0.25)
        actual = kv_tier_cpu.tier_attention_cpu(q, tier, chosen, bits, 0.25)
        torch.testing.assert_close(actual[0], expected[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(actual[1], expected[1], atol=1e-5, rtol=1e-5)
    assert actual[1][1, 2].eq(-math.inf).all() and not actual[0][1, 2].any()
    bounds = kv_tier_cpu.tier_block_bounds_cpu(q, tier, bits)
    torch.testing.assert_close(bounds, kv_tier.block_bounds_reference(q, tier, bits), atol=1e-4, rtol=1e-5)
    # a decode step: the tier, the hot slots (two empty) and the token itself in one softmax, masses pooled
    hot_keys, hot_values = torch.randn(batch, heads, 7, dim, generator=gen), torch.randn(batch, heads, 7, dim,
                                                                                         generator=gen)
    hot_positions = torch.arange(7).expand(batch, heads, 7).masked_fill(torch.arange(7) % 3 == 1, -1)
    k, v = torch.randn(batch, heads, 1, dim, generator=gen), torch.randn(batch, heads, 1, dim, generator=gen)
    from dynasparse.kernels.policies import POLICIES
    for policy in ("kvzip", "h2o", "streaming"):
        rule = POLICIES[policy]
        expected = kv_tier._attend_one(q.reshape(batch, heads * rows, 1, dim), k, v, hot_keys, hot_values,
                                       hot_positions, kv_tier.tier_attention_reference(q, tier, chosen, bits, 0.25),
                                       0.25, rule)
        out, *masses = kv_tier_cpu.tier_decode_attention_cpu(q, tier, chosen, bits, 0.25, hot_keys, hot_values,
                                                              hot_positions, k, v,
                                                              rule.reduce if rule.uses_attention else None)
        torch.testing.assert_close(out.reshape(batch, heads * rows, 1, dim).transpose(1, 2), expected[0],
                                   atol=1e-5, rtol=1e-5)
        for got, want in zip(masses, expected[1:]):
            torch.testing.assert_close(got, want if want is not None else torch.zeros_like(got), atol=1e-5, rtol=1e-5)


def _prompts():
    ids, mask = decoder_prompts(2, 64)
    return ids, mask


def test_the_byte_budget_counts_both_tiers():
    ids, mask = _prompts()
    for budget in (0.35, 0.6):
        config = dynasparse.KVEvictionConfig(policy="h2o", budget=budget, sink=2, recent=4, chunk_size=24,
                                             unit="bytes", tier_bits=4, tier_group=8)
        stats = dynasparse.generate(llama(), ids, mask, max_new_tokens=8, kv=config).stats
        assert stats.cache_allocated_bytes <= budget * stats.cache_full_bytes
        assert stats.cache_allocated_bytes >= 0.9 * budget * stats.cache_full_bytes  # spare bytes pin tokens


@pytest.mark.parametrize("budget", [0.2, 0.3, 0.6])
def test_spare_bytes_buy_as_many_pins_as_fit(budget):
    """A byte budget that holds every block spends the rest on pinned slots, each one less token for the tier
    to hold, up to the last slot that fits."""
    from dynasparse.plans import CacheSite
    from dynasparse.runtime import kv_cache as runtime

    site = CacheSite(0, "c", "kvzip", 3, 64, 64, torch.float32, tier_bits=4, tier_group=32)
    config = dynasparse.KVEvictionConfig(policy="kvzip", budget=budget, sink=4, recent=16, unit="bytes", tier_bits=4)
    seq_len = 2048
    limit = budget * seq_len * runtime.token_bytes(site)
    hot, blocks = runtime._tier_size(site, config, seq_len, *runtime._share(site, config, seq_len))
    pins = hot - (4 + 16 + 32)
    rest = seq_len - 4 - 16
    assert pins > 0 and blocks == math.ceil((rest - pins) / 32)  # the tier holds every token not pinned
    assert runtime._size_bytes(site, hot, blocks) <= limit
    assert all(runtime._size_bytes(site, hot + more, math.ceil((rest - pins - more) / 32)) > limit
               for more in range(1, rest - pins + 1))  # no more pins fit


def test_a_budget_too_small_for_the_tier_names_the_minimum():
    ids, mask = _prompts()
    config = dynasparse.KVEvictionConfig(policy="h2o", budget=0.1, sink=2, recent=4, chunk_size=24, unit="bytes",
                                         tier_bits=4, tier_group=8)
    with pytest.raises(DynasparseError, match=r"at least 0\.\d+ of the bytes"):
        dynasparse.generate(llama(), ids, mask, max_new_tokens=8, kv=config)


def test_an_int8_tier_holding_every_token_generates_the_full_cache_tokens():
    ids, mask = _prompts()
    full = dynasparse.generate(llama(), ids, mask, max_new_tokens=8, kv=dynasparse.KVEvictionConfig(policy="full"))
    config = dynasparse.KVEvictionConfig(policy="h2o", budget=70, sink=2, recent=4, chunk_size=24, tier_bits=8,
                                         tier_group=8)
    out = dynasparse.generate(llama(), ids, mask, max_new_tokens=8, kv=config)
    assert out.stats.cache_capacity[0] < 72  # the hot slots alone cannot hold the sequence: the tier does
    assert torch.equal(out.sequences, full.sequences)


def test_the_tier_refuses_onnx_export_clearly(tmp_path):
    config = dynasparse.KVEvictionConfig(policy="h2o", budget=32, sink=2, recent=4, tier_bits=4, tier_group=8)
    model = dynasparse.optimize(llama(), config, example_kwargs={"input_ids": torch.ones(1, 8, dtype=torch.long)})
    with pytest.raises(DynasparseError, match="no ONNX spelling"):
        dynasparse.export_onnx(model, tmp_path / "tier.onnx")


def test_a_step_longer_than_a_block_spills_a_partial_block():
    hot, tier = _filled(batch=1, heads=2, tokens=20, blocks=4)  # 20 slots, all full
    before = set(hot["positions"][0, 0].tolist())
    kv_tier.make_room(hot, tier, 4, sink=2, recent=4, incoming=torch.tensor([17]))
    assert (hot["positions"][..., :-1] < 0).sum(-1).min() >= 17  # room for the step
    held = set(hot["positions"][0, 0].tolist()) | set(tier["cold_positions"][0, 0].flatten().tolist())
    assert held - {-1} == before - {-1}  # nothing lost: 2 sinks stay, 18 tokens in a full and a partial block
    assert (tier["cold_positions"][0, 0] >= 0).sum() == 18


def test_a_step_wider_than_the_full_precision_slots_says_what_to_raise():
    hot, tier = _filled(batch=1, heads=1, tokens=20, blocks=4)
    with pytest.raises(DynasparseError, match="raise KVEvictionConfig.recent or tier_group"):
        kv_tier.make_room(hot, tier, 4, sink=2, recent=4, incoming=torch.tensor([30]))
