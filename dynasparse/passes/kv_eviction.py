"""KV eviction: every causal attention site of a decoder becomes attention over a bounded cache.

    attention(q, k, v, mask)   ⟶   kv_cache_attention(q, k, v, mask, keys, values, positions, scores, seen)

The model is captured **without** a cache; this pass gives each site a fixed-capacity cache that lives on
the graph module as buffers (``kv_cache_<layer>_<field>``) and that ``dynasparse.runtime`` allocates,
resets and resizes. New keys enter after RoPE (the site sees them post-rotation), one cache row per KV
head. Layers outside ``layers`` get a cache with the ``full`` policy, so every layer still remembers.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from dynasparse.config import BaseConfig, as_tuple, config_type
from dynasparse.errors import DynasparseError
from dynasparse.ir.analysis import GraphAnalysis
from dynasparse.ir.nodes import bound_args, copy_meta, fake
from dynasparse.ir.ops import (KV_CACHE_ATTENTION, KV_CACHE_SPARSE_ATTENTION, KV_TIERED_ATTENTION,
                               KV_TIERED_SPARSE_ATTENTION)
from dynasparse.kernels.kv_cache import empty_state
from dynasparse.kernels.kv_tier import empty_tier
from dynasparse.kernels.quantize import check as check_quantization
from dynasparse.kernels.policies import POLICIES
from dynasparse.passes.retrieval_heads import HeadScores
from dynasparse.plans import CACHE_META, CachePlan, CacheSite
from dynasparse.registry import PassResult

class KVEvictionPass:
    name = "kv_eviction"

    def __init__(self, config: KVEvictionConfig):
        self.config = config

    def apply(self, gm: torch.fx.GraphModule, analysis: GraphAnalysis) -> PassResult:
        c = self.config
        # find sites: every site must be causal (a KV cache means generation)
        acausal = [s for s in analysis.sites if not s.causal]
        if acausal:
            raise DynasparseError(
                f"KV eviction needs a causal decoder, but attention at layer(s) {[s.layer for s in acausal]} is "
                "not causal (an encoder, or a mask the analysis cannot read as causal). Use it on decoder-only "
                "language models (Llama, Qwen2, Mistral, GPT-2, ...).")
        chosen = [s for s in analysis.sites if c.applies_to(s.layer)]
        if not chosen:
            raise DynasparseError(f"KVEvictionConfig.layers={c.layers} matches no attention layer; the model has "
                                  f"layers {sorted(s.layer for s in analysis.sites)}")
        retrieval = _retrieval_heads(c, analysis)
        result = PassResult(self.name)
        sites = []
        for site in analysis.sites:
            # decide: the configured policy on chosen layers (per head group with head scores), full elsewhere
            policy = c.policy if site in chosen else "full"
            k, v = fake(site.k), fake(site.v)
            cache = CacheSite(site.layer, f"kv_cache_{site.index}", policy, site.num_kv_heads, site.head_dim,
                              int(v.shape[-1]), k.dtype)
            groups = [(cache, ())]
            if retrieval is not None and policy != "full":
                kept = tuple(h for h in range(site.num_kv_heads) if (site.layer, h) in retrieval)
                local = tuple(h for h in range(site.num_kv_heads) if h not in kept)
                other = "streaming" if c.other_heads == "streaming" else "other"
                groups = [(dataclasses.replace(cache, prefix=f"{cache.prefix}_{role}", num_kv_heads=len(heads),
                                               policy="streaming" if role == "streaming" else c.policy, role=role,
                                               heads=heads), heads)
                          for role, heads in (("retrieval", kept), (other, local)) if heads]
                if len(groups) == 1:  # every head of the layer in one group: no split
                    groups = [(dataclasses.replace(groups[0][0], heads=()), ())]
            if c.tier_bits:  # what the budgeted (not streaming) caches evict is kept quantized
                groups = [(_tiered(group, c) if group.policy not in ("full", "streaming") else group, heads)
                          for group, heads in groups]
            # rewrite: the cache state enters as buffers (sized by the runtime), the op updates it in place
            args = bound_args(site.node)
            plan_nodes = [args["counts"], args["indices"], args["counts"].args[0]] if site.sparse else []
            with gm.graph.inserting_before(site.node):
                node = _cached_attention(gm, site, args, groups, c)
            copy_meta(site.node, node)
            site.node.replace_all_uses_with(node)
            gm.graph.erase_node(site.node)
            for plan_node in plan_nodes:  # the sparse site's own plan: the cache step plans over cache + chunk
                if not plan_node.users:
                    gm.graph.erase_node(plan_node)
            sites += [group for group, _ in groups]
            result.num_matches += 1
            prefill = ", block-sparse prefill" if site.sparse else ""
            for group, heads in groups:
                budget = "every token" if group.policy == "full" else f"budget {c.budget!r} ({c.schedule})"
                if group.role == "streaming":
                    budget = "sinks + recent window"
                elif group.role == "retrieval" and c.other_heads == "policy":
                    budget = "every token"
                elif group.role == "other":
                    budget = f"what budget {c.budget!r} leaves"
                who = f"KV heads {list(heads)}" if heads else f"{site.num_kv_heads} KV heads"
                role = "" if group.role == "all" else f" ({group.role} heads)"
                tier = f", int{c.tier_bits} tier" if group.tier_bits else ""
                result.applied.append(f"layer {site.layer}: {group.policy} cache{role}, {budget}{tier}, sink {c.sink}, "
                                      f"recent {c.recent}, {who}{prefill}")
        gm.meta[CACHE_META] = CachePlan(c, tuple(sites))
        return result


def _retrieval_heads(config: KVEvictionConfig, analysis: GraphAnalysis) -> set[tuple[int, int]] | None:
    """(layer, KV head) pairs that keep the budget, from the config's head scores (None: no head groups)."""
    if config.head_scores is None:
        return None
    scores = HeadScores.load(config.head_scores)
    shape = [len(row) for row in scores.scores]
    for site in analysis.sites:  # a drafter's graph holds the first layers only: match by layer index
        if site.layer is None or site.layer >= len(shape) or shape[site.layer] != site.num_kv_heads:
            raise DynasparseError(
                f"the head scores in {config.head_scores} ({scores.model or 'unnamed'}) cover {len(shape)} layers "
                f"of {shape[:1] or [0]} KV heads; this model's layer {site.layer} has {site.num_kv_heads} KV heads: "
                "calibrate this model's heads (calibrate_retrieval_heads)")
    return scores.retrieval(config.retrieval_heads)


def _tiered(cache: CacheSite, config: KVEvictionConfig) -> CacheSite:
    """``cache`` with a compressed tier; the tier's group must divide the head dimensions."""
    try:
        check_quantization(config.tier_bits, config.tier_group, cache.head_dim, cache.value_dim)
    except ValueError as error:
        raise DynasparseError(f"{type(config).__name__}.tier_bits / tier_group at layer {cache.layer}: {error}") \
            from None
    return dataclasses.replace(cache, tier_bits=config.tier_bits, tier_group=config.tier_group)


def _cached_attention(gm: torch.fx.GraphModule, site, args: dict, groups: list, c: KVEvictionConfig
                      ) -> torch.fx.Node:
    """One cache op per head group (each over its own buffers); a split site gathers its groups' heads
    of q / k / v (and of a per-head mask), and puts the outputs back in head order."""
    graph = gm.graph
    outputs, order = [], []
    ratio = site.num_heads // site.num_kv_heads  # query head j reads KV head j // ratio
    device = fake(site.k).device
    plan = _sparse_plan(site.node) if site.sparse else ()
    for cache, heads in groups:
        state = empty_state(1, cache.num_kv_heads, 1, cache.head_dim, cache.value_dim, cache.dtype, device)
        if cache.tier_bits:
            state |= empty_tier(1, cache.num_kv_heads, 1, cache.head_dim, cache.value_dim, cache.tier_bits,
                                cache.tier_group, device)
            op = KV_TIERED_SPARSE_ATTENTION if site.sparse else KV_TIERED_ATTENTION
            settings = (c.sink, c.recent, c.window, c.pool, c.tier_bits, c.tier_read, *plan)
        else:
            op = KV_CACHE_SPARSE_ATTENTION if site.sparse else KV_CACHE_ATTENTION
            settings = (c.sink, c.recent, c.window, c.pool, *plan)
        for field, tensor in state.items():
            gm.register_buffer(cache.buffer(field), tensor, persistent=False)
        q, k, v, mask = args["q"], args["k"], args["v"], args["mask"]
        if heads:
            query_heads = [h * ratio + g for h in heads for g in range(ratio)]
            q = _select_heads(gm, q, f"{cache.prefix}_query_heads", query_heads, device)
            k = _select_heads(gm, k, f"{cache.prefix}_heads", list(heads), device)
            v = _select_heads(gm, v, f"{cache.prefix}_heads", list(heads), device)
            if isinstance(mask, torch.fx.Node) and fake(mask) is not None and fake(mask).dim() == 4 \
                    and fake(mask).shape[1] > 1:
                mask = _select_heads(gm, mask, f"{cache.prefix}_query_heads", query_heads, device)
            order += query_heads
        state = [graph.get_attr(cache.buffer(field)) for field in cache.fields]
        outputs.append(graph.call_function(op, (q, k, v, mask, args["is_causal"], args["scale"], *state,
                                                cache.policy, *settings)))
    if len(outputs) == 1:
        return outputs[0]
    joined = graph.call_function(torch.ops.aten.cat.default, (outputs, 2))  # sequence-major: [B, T, Hq, Dv]
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return _select_heads(gm, joined, f"{groups[0][0].prefix.rsplit('_', 1)[0]}_head_order", inverse, device, dim=2)


def _select_heads(gm: torch.fx.GraphModule, node: torch.fx.Node, name: str, heads: list[int], device: torch.device,
                  dim: int = 1) -> torch.fx.Node:
    """``node`` with only ``heads`` along ``dim``, in that order (the index is a buffer of the graph)."""
    if not hasattr(gm, name):
        gm.register_buffer(name, torch.tensor(heads, dtype=torch.long, device=device), persistent=False)
    index = gm.graph.get_attr(name)
    return gm.graph.call_function(torch.ops.aten.index_select.default, (node, dim, index))


def _sparse_plan(node: torch.fx.Node) -> tuple:
    """The plan settings of a block-sparse site (its ``block_plan`` node's arguments, then its decode share),
    in the order ``kv_cache_sparse_attention`` takes them: the cache step then plans over cache + chunk
    itself."""
    plan = bound_args(bound_args(node)["counts"].args[0])
    return (plan["block_size"], plan["estimator"], plan["selector"], plan["amount"], plan["sink_blocks"],
            plan["local_blocks"], plan["min_seq_len"], plan["window"], bound_args(node)["decode_keep"])


@config_type
@dataclasses.dataclass
class KVEvictionConfig(BaseConfig):
    """A bounded KV cache for decoders, owned by the runtime (H2O / StreamingLLM / TOVA / SnapKV / KNorm /
    Expected Attention).

    ``policy``: ``"full"`` (no eviction: the reference), ``"streaming"`` (sinks + recent window),
    ``"h2o"`` (accumulated attention mass), ``"h2o_mean"`` (that mass per query that saw the token),
    ``"tova"`` (the newest query's attention), ``"snapkv"`` (the last ``window`` queries of each chunk,
    pooled over ``pool`` neighbouring keys), ``"knorm"`` (the keys with the largest L2 norm leave first:
    no attention weights needed) or ``"expected_attention"`` (the attention a Gaussian fitted to the last
    ``window`` queries pays each key in expectation, times its value's norm).
    ``budget``: cached tokens per layer, as an int, a share of the sequence (prompt + new tokens) as a
    float in (0, 1], or one value per layer. ``schedule="pyramid"`` spreads the same total as a linear
    ramp from 1.5x the budget at the first layer to 0.5x at the last (PyramidKV). ``sink`` first tokens
    and the ``recent`` newest tokens are never evicted. ``chunk_size``: prompt tokens per prefill step.
    ``compress``: ``"after_prefill"`` (default) holds the whole prompt until it is read, then evicts once
    down to the budget with scores that saw every prompt token, the question at its end included (SnapKV
    and kvpress do this): prefill holds the prompt's full cache, decode the budget. ``"every_chunk"``
    evicts after each chunk, so prefill memory stays at budget + chunk, but early chunks leave before
    the question is read. ``layers``: layers that evict (the others keep a full cache).
    ``unit="bytes"``: a float budget is a share of the full cache's bytes (its keys and values for the
    whole sequence, in the model's dtype) and counts every byte the bounded cache holds per slot (key,
    value, position and score), so a 0.25 cache really holds a quarter of the memory.
    ``policy="kvzip"`` scores tokens by re-reading the prompt after it (``compress="after_prefill"``:
    about one more prefill); with ``"every_chunk"`` it keeps the most attention any query paid each token.
    ``reread_prefix``: token ids fed before each re-read chunk, KVzip's instruction to repeat the context
    (``dynasparse.repeat_prompt(tokenizer)`` builds it; on SmolLM2 at 10% of the bytes it lifts a planted
    fact's recall from 4/10 to 7/10).
    ``head_scores``: a JSON file of per-KV-head retrieval scores (``calibrate_retrieval_heads``; computed
    once per model). The top ``retrieval_heads`` share of KV heads then keep the budget under ``policy``,
    the others only the sinks and the recent window (StreamingLLM), each group in caches of its own size,
    so the bytes really shrink; a byte budget is spread over the retrieval heads after the others' share.
    ``other_heads="policy"`` turns the split around (head-level budgets, HeadKV / Ada-KV): the retrieval
    heads keep every token (quantized, with ``tier_bits``) and the other heads evict under ``policy`` in
    whatever the budget leaves.
    ``tier_bits`` (2, 4 or 8): a compressed tier (KIVI). When the budget cannot hold the whole sequence in
    the model's dtype, the cache keeps the sinks and the recent window in full precision and every older
    token, a block of ``tier_group`` tokens at a time, quantized (keys per channel over the block, values
    per token over ``tier_group`` channels, fp16 scales); the budget then counts both tiers and everything
    beside them, and drops the lowest-scored blocks only when even the quantized tokens do not fit (with
    ``policy="kvzip"`` blocks that leave after the prompt outrank the prompt's: re-read scores do not compare
    with later attention, and what was read last is what the next tokens need most; the prompt's last
    ``window`` tokens past the recent window, where a question sits, are never dropped). A byte budget
    that holds every block with bytes to spare keeps the highest-scored tokens in full precision with
    them (pinned for the whole generation). Decode steps read the top ``tier_read`` share of the blocks per KV head (by a bound of each block's logit),
    dequantizing only those. A budget that holds the whole sequence keeps it in full precision (no tier).
    """

    policy: str = "h2o"
    budget: int | float | tuple = 0.2
    sink: int = 4
    recent: int = 32
    schedule: str = "uniform"
    window: int = 32
    pool: int = 5
    chunk_size: int = 512
    compress: str = "after_prefill"
    unit: str = "tokens"
    head_scores: str | None = None
    retrieval_heads: float = 0.25
    other_heads: str = "streaming"
    tier_bits: int | None = None
    tier_group: int = 32
    tier_read: float = 1.0
    reread_prefix: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if self.policy not in POLICIES:
            raise DynasparseError(f"{name}.policy={self.policy!r} is not a known policy; expected one of "
                                  f"{sorted(POLICIES)}")
        if self.compress not in ("after_prefill", "every_chunk"):
            raise DynasparseError(f"{name}.compress={self.compress!r}; expected 'after_prefill' (evict once the "
                                  "prompt is read) or 'every_chunk' (evict after each prefill chunk)")
        if self.unit not in ("tokens", "bytes"):
            raise DynasparseError(f"{name}.unit={self.unit!r}; expected 'tokens' (budget counts cached tokens) or "
                                  "'bytes' (a float budget is a share of the full cache's bytes)")
        if self.unit == "bytes" and not all(isinstance(b, float) for b in as_tuple(self.budget)):
            raise DynasparseError(f"{name}.budget={self.budget!r} with unit='bytes': give a share of the full "
                                  "cache's bytes as a float in (0, 1] (or one per layer)")
        if self.schedule not in ("uniform", "pyramid"):
            raise DynasparseError(f"{name}.schedule={self.schedule!r}; expected 'uniform' or 'pyramid'")
        for field_name, low in (("sink", 0), ("recent", 0), ("window", 1), ("pool", 1), ("chunk_size", 1)):
            self.check_int(field_name, low)
        if isinstance(self.budget, list):
            self.budget = tuple(self.budget)
        for value in as_tuple(self.budget):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise DynasparseError(f"{name}.budget={self.budget!r}: give tokens (int), a share of the "
                                      "sequence (float in (0, 1]) or one of those per layer")
            if isinstance(value, float) and not 0.0 < value <= 1.0:
                raise DynasparseError(f"{name}.budget={value!r}: a float budget is a share of the sequence, "
                                      "in (0, 1]; give an int for a number of tokens")
            if isinstance(value, int) and value < self.sink + self.recent + 1 and self.policy != "full":
                raise DynasparseError(
                    f"{name}.budget={value} tokens is below sink + recent + 1 = {self.sink + self.recent + 1}: "
                    "the sinks and the recent window are never evicted, so the cache must hold them and one "
                    "more token; raise the budget or lower sink / recent")
        self.reread_prefix = tuple(self.reread_prefix)
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.reread_prefix):
            raise DynasparseError(f"{name}.reread_prefix must be token ids (ints >= 0); build it with "
                                  "dynasparse.repeat_prompt(tokenizer)")
        if self.reread_prefix and not (POLICIES[self.policy].rereads_prompt and self.compress == "after_prefill"):
            raise DynasparseError(f"{name}.reread_prefix is fed before KVzip's re-read of the prompt; use it with "
                                  "policy='kvzip' and compress='after_prefill' (policy "
                                  f"{self.policy!r}, compress {self.compress!r} re-read nothing)")
        self.check_range("retrieval_heads", 0.0, 1.0, low_open=True)
        if self.other_heads not in ("streaming", "policy"):
            raise DynasparseError(f"{name}.other_heads={self.other_heads!r}; expected 'streaming' (the heads outside "
                                  "the retrieval share keep sinks + recent window) or 'policy' (the retrieval heads "
                                  "keep every token, the others evict under policy in what the budget leaves)")
        if self.other_heads == "policy" and self.head_scores is None:
            raise DynasparseError(f"{name}.other_heads='policy' splits KV heads by their retrieval scores: give "
                                  "head_scores (dynasparse.calibrate_retrieval_heads)")
        if self.head_scores is not None and (self.schedule != "uniform" or isinstance(self.budget, tuple)
                                             or self.policy == "full"):
            raise DynasparseError(f"{name}: head_scores splits each layer's KV heads into retrieval and streaming "
                                  "groups under one budget; use it with schedule='uniform', one budget and an "
                                  "evicting policy")
        if self.tier_bits is not None:
            try:
                check_quantization(self.tier_bits, self.tier_group)
            except ValueError as error:
                raise DynasparseError(f"{name}.tier_bits / tier_group: {error}") from None
            self.check_range("tier_read", 0.0, 1.0, low_open=True)
            if self.policy == "full" or self.compress != "after_prefill" or self.schedule != "uniform" \
                    or isinstance(self.budget, tuple):
                raise DynasparseError(f"{name}: tier_bits keeps what a bounded cache evicts after the prompt; use it "
                                      "with an evicting policy, compress='after_prefill', schedule='uniform' and one "
                                      "budget")
        if self.schedule == "pyramid" and isinstance(self.budget, tuple):
            raise DynasparseError(f"{name}: schedule='pyramid' spreads one budget over the layers; "
                                  "give budget as one int or float, or give per-layer budgets without it")

    def capacities(self, num_layers: int, seq_len: int, slot: tuple[int, int] = (1, 1)) -> list[int]:
        """Cache slots per layer for a sequence of ``seq_len`` tokens (never more than it needs).
        ``slot``: (bytes a slot of the bounded cache holds, bytes a token takes in the full cache), per row;
        with ``unit="bytes"`` the scratch slot and the row's token counter (8 bytes) are paid for too."""
        budgets = list(self.budget) if isinstance(self.budget, tuple) else [self.budget] * num_layers
        if len(budgets) != num_layers:
            raise DynasparseError(f"{type(self).__name__}.budget has {len(budgets)} values for a model with "
                                  f"{num_layers} attention layers; give one per layer")
        if self.unit == "bytes":
            tokens = [math.floor((b * seq_len * slot[1] - 8) / slot[0]) - 1 for b in budgets]
        else:
            tokens = [math.ceil(b * seq_len) if isinstance(b, float) else b for b in budgets]
        if self.schedule == "pyramid" and num_layers > 1:
            tokens = [round(t * (1.5 - i / (num_layers - 1))) for i, t in enumerate(tokens)]
        if self.policy == "full":
            return [seq_len] * num_layers
        floor = self.sink + self.recent + 1
        short = [t for t in tokens if t < floor]
        if short and seq_len >= floor:
            raise DynasparseError(
                f"{type(self).__name__}: budget {self.budget!r} gives {min(short)} cache slots for "
                f"{seq_len} tokens, below sink + recent + 1 = {floor}; raise the budget or lower sink / recent")
        return [min(max(t, floor), seq_len) for t in tokens]
