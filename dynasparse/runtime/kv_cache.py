"""The runtime side of the bounded KV cache: allocate each layer's slots, bind them, measure them.

The KV pass leaves a ``CachePlan`` on the graph module; ``KVCache`` sizes every layer for one generation
(batch, prompt + new tokens, the config's budgets) and binds the tensors as the graph's buffers, so the
graph's ``kv_cache_attention`` nodes update them in place, step after step, with no reallocation.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import torch

from dynasparse.errors import DynasparseError
from dynasparse.kernels import kv_tier
from dynasparse.kernels.kv_cache import empty_state, priorities
from dynasparse.kernels.kv_tier import block_bytes, empty_tier
from dynasparse.kernels.policies import POLICIES
from dynasparse.plans import CACHE_META, CachePlan, CacheSite

if TYPE_CHECKING:  # annotations only: the config reaches the runtime through the CachePlan
    from dynasparse.passes.kv_eviction import KVEvictionConfig


def token_bytes(site: CacheSite) -> int:
    """Bytes one token takes in a full (unbounded) cache: its key and value per KV head."""
    return site.num_kv_heads * (site.head_dim + site.value_dim) * site.dtype.itemsize


def slot_bytes(site: CacheSite) -> int:
    """Bytes one slot of the bounded cache holds: key and value, and the position (int64) and score
    (fp32) that eviction keeps beside them."""
    return token_bytes(site) + site.num_kv_heads * (8 + 4)


def tier_bytes(site: CacheSite) -> int:
    """Bytes one cold block of a tiered site takes per row."""
    return block_bytes(site.num_kv_heads, site.head_dim, site.value_dim, site.tier_bits, site.tier_group)


def _unpinned_hot(site: CacheSite, config: KVEvictionConfig) -> int:
    """Full-precision slots a tiered site holds besides any pins: sinks, recent window and one block."""
    return config.sink + config.recent + site.tier_group


def _tier_size(site: CacheSite, config: KVEvictionConfig, seq_len: int, tokens: int, budget: float | None,
               pins: bool = True) -> tuple[int, int]:
    """(hot slots, cold blocks) of a tiered site that may hold ``tokens`` in full precision, or, with a byte
    ``budget`` per row, whatever fits in it. No tier when the full-precision cache holds the sequence.
    A byte budget that holds every block with bytes to spare spends them on pinned tokens (``pins``):
    hot slots for the highest-scored tokens, each one less for the tier to hold."""
    if tokens >= seq_len:
        return seq_len, 0
    group = site.tier_group
    hot = min(_unpinned_hot(site, config), seq_len)
    rest = max(seq_len - config.sink - config.recent, 0)  # the tokens that may leave the hot slots
    most = math.ceil(rest / group)
    if budget is not None and pins and _size_bytes(site, hot, most) < budget:
        extra = _pinned_slots(site, hot, rest, budget)
        return hot + extra, math.ceil((rest - extra) / group)
    hot_bytes = _size_bytes(site, hot, 0)
    if budget is None:
        blocks = (tokens - hot) // group
        least = f"{hot + group} tokens"
    else:
        blocks = math.floor((budget - hot_bytes) / tier_bytes(site))
        least = f"{(hot_bytes + tier_bytes(site)) / (seq_len * token_bytes(site)):.3f} of the bytes"
    if blocks < 1:
        raise DynasparseError(
            f"{type(config).__name__}.budget={config.budget} is too small for a compressed tier over {seq_len} "
            f"tokens at layer {site.layer}: the full-precision sinks, recent window and one block of "
            f"{group} tokens ({hot} slots) and one cold block need at least {least}; raise the budget, or lower "
            "sink / recent / tier_group")
    return hot, min(blocks, most)


def _pinned_slots(site: CacheSite, hot: int, rest: int, budget: float) -> int:
    """The most pinned slots beside ``hot`` full-precision ones that ``budget`` bytes per row pay for while
    the tier holds every block of the ``rest`` tokens that are not pinned."""
    def size(extra: int) -> int:
        return _size_bytes(site, hot + extra, math.ceil((rest - extra) / site.tier_group))

    per_token = tier_bytes(site) / site.tier_group  # what a pinned token saves the tier, on average
    estimate = math.floor((budget - size(0)) / (slot_bytes(site) - per_token))
    # the tier shrinks a whole block at a time, so the exact count lies within a block of the estimate
    near = range(max(estimate - site.tier_group, 0), min(estimate + site.tier_group, rest) + 1)
    return max((extra for extra in near if size(extra) <= budget), default=0)


def _share(site: CacheSite, config: KVEvictionConfig, seq_len: int) -> tuple[int, float | None]:
    """(tokens the budget holds in full precision, its bytes per row with ``unit="bytes"``) for one site."""
    if config.unit == "bytes":
        budget = config.budget * seq_len * token_bytes(site)
        return _slots_within(site, budget), budget
    return (math.ceil(config.budget * seq_len) if isinstance(config.budget, float) else config.budget), None


def site_sizes(sites: Sequence[CacheSite], config: KVEvictionConfig, seq_len: int) -> list[tuple[int, int]]:
    """(slots, cold blocks) per cache site for a sequence of ``seq_len`` tokens.

    Without head groups every evicting layer gets the config's budget. With them (``head_scores``),
    streaming groups hold the sinks and the recent window, and retrieval groups the budget: in tokens, or,
    with ``unit="bytes"``, whatever the byte budget leaves once the streaming groups (and any full layers)
    are paid for, spread evenly over the retrieval heads. A tiered site (``tier_bits``) turns its share into
    full-precision sinks + recent window and cold blocks (``_tier_size``)."""
    if all(s.role == "all" for s in sites):
        if config.tier_bits:  # every evicting site is tiered
            return [_tier_size(site, config, seq_len, *_share(site, config, seq_len)) if site.tier_bits
                    else (seq_len, 0) for site in sites]
        evicting = [s for s in sites if s.policy != "full"]
        slot = max(((slot_bytes(s), token_bytes(s)) for s in evicting), default=(1, 1))
        budgets = iter(config.capacities(len(evicting), seq_len, slot) if evicting else [])
        return [(next(budgets), 0) if site.policy != "full" else (seq_len, 0) for site in sites]
    if config.other_heads == "policy":
        return _whole_retrieval_sizes(sites, config, seq_len)
    floor = min(config.sink + config.recent + 1, seq_len)
    fixed = {s.prefix: seq_len if s.policy == "full" else floor for s in sites if s.role != "retrieval"}
    retrieval = [s for s in sites if s.role == "retrieval"]
    budgets: dict[str, float | None] = {s.prefix: None for s in retrieval}
    if config.unit == "bytes" and retrieval:  # per row; every site also holds a scratch slot and a counter
        full = config.budget * seq_len * sum(token_bytes(s) for s in sites)
        paid = sum(_size_bytes(s, fixed[s.prefix], 0) for s in sites if s.prefix in fixed)
        per_token = sum(slot_bytes(s) for s in retrieval)
        tokens = math.floor((full - paid - per_token - 8 * len(retrieval)) / per_token)
        heads = sum(s.num_kv_heads for s in retrieval)
        budgets = {s.prefix: (full - paid) * s.num_kv_heads / heads for s in retrieval}
        if tokens < floor and not any(s.tier_bits for s in retrieval):
            least = (paid + (floor + 1) * per_token + 8 * len(retrieval)) / (seq_len * sum(map(token_bytes, sites)))
            raise DynasparseError(
                f"{type(config).__name__}.budget={config.budget} of the bytes is too small for "
                f"{len(retrieval)} retrieval head groups over {seq_len} tokens: the streaming heads' sinks and recent "
                f"windows take {paid / full:.0%} of it and each retrieval head needs sink + recent + 1 = {floor} "
                f"slots; give budget >= {least:.3f}, fewer retrieval_heads, or a smaller sink / recent")
    else:
        tokens = config.capacities(1, seq_len)[0]
    sizes = []
    for site in sites:
        if site.prefix in fixed:
            sizes.append((fixed[site.prefix], 0))
        elif site.tier_bits:
            sizes.append(_tier_size(site, config, seq_len, min(tokens, seq_len), budgets[site.prefix]))
        else:
            sizes.append((min(tokens, seq_len), 0))
    return sizes


def _whole_retrieval_sizes(sites: Sequence[CacheSite], config: KVEvictionConfig, seq_len: int
                           ) -> list[tuple[int, int]]:
    """``other_heads="policy"``: retrieval groups hold every token (a tiered one: sinks + recent window in
    full precision, every block quantized), layers that do not evict hold the sequence, and the other groups
    share the rest of the budget (with ``unit="bytes"``, by KV heads) or keep the budget's tokens."""
    roomy = seq_len * max(token_bytes(s) for s in sites)  # more than any tier over the sequence takes
    whole = {s.prefix: _tier_size(s, config, seq_len, seq_len - 1, roomy, pins=False) if s.tier_bits else (seq_len, 0)
             for s in sites if s.role == "retrieval" or s.policy == "full"}
    others = [s for s in sites if s.prefix not in whole]
    if config.unit != "bytes":
        tokens = min(config.capacities(1, seq_len)[0], seq_len)
        return [whole[s.prefix] if s.prefix in whole else _tier_size(s, config, seq_len, tokens, None)
                if s.tier_bits else (tokens, 0) for s in sites]
    budget = config.budget * seq_len * sum(token_bytes(s) for s in sites)  # per row
    paid = sum(_size_bytes(s, *whole[s.prefix]) for s in sites if s.prefix in whole)
    heads = sum(s.num_kv_heads for s in others)
    sizes = {}
    for site in others:
        share = (budget - paid) * site.num_kv_heads / heads
        if site.tier_bits:
            sizes[site.prefix] = _tier_size(site, config, seq_len, seq_len - 1, share)
        else:
            sizes[site.prefix] = (min(_slots_within(site, share), seq_len), 0)
        if share <= 0 or sizes[site.prefix][0] < min(config.sink + config.recent + 1, seq_len):
            raise DynasparseError(
                f"{type(config).__name__}.budget={config.budget} of the bytes is too small for other_heads='policy' "
                f"over {seq_len} tokens: the retrieval heads' whole context takes {paid / budget:.0%} of it and "
                f"leaves the other heads too little; raise the budget or lower retrieval_heads")
    return [whole.get(s.prefix) or sizes[s.prefix] for s in sites]


def _size_bytes(site: CacheSite, slots: int, blocks: int) -> int:
    """Bytes per row of a site with ``slots`` full-precision slots (+ the scratch slot and the row's token
    counter) and ``blocks`` cold blocks."""
    return slot_bytes(site) * (slots + 1) + 8 + (blocks * tier_bytes(site) if blocks else 0)


def _slots_within(site: CacheSite, budget: float) -> int:
    """The most full-precision slots a site without a tier holds in ``budget`` bytes per row."""
    return math.floor((budget - 8) / slot_bytes(site)) - 1


def cache_plan(graph_module: torch.fx.GraphModule) -> CachePlan:
    plan = graph_module.meta.get(CACHE_META)
    if plan is None:
        raise DynasparseError("this model has no KV cache: optimize it with a KVEvictionConfig (or pass the "
                              "plain model to dynasparse.generate, which does that)")
    return plan


class KVCache:
    """Every layer's cache state for one batch of sequences of up to ``seq_len`` tokens.

    Owned by whoever drives the steps: ``bind`` hands the tensors to a captured graph, which updates them
    in place; the ONNX Runtime runner feeds them in and stores the updated ones instead.
    """

    def __init__(self, sites: Sequence[CacheSite], config: KVEvictionConfig, batch: int, seq_len: int,
                 device: torch.device | str = "cpu", reserve: int = 0, prompt_len: int = 0):
        self.sites = tuple(sites)
        self.config, self.seq_len, self.reserve = config, seq_len, reserve
        sizes = site_sizes(self.sites, config, seq_len)
        self.capacities = [slots for slots, _ in sizes]
        self.tier_blocks = [blocks for _, blocks in sizes]
        # ``reserve`` extra slots hold tokens that may be rolled back (drafts) until ``shrink`` evicts;
        # with ``compress="after_prefill"`` the prompt fits whole until ``compress`` evicts once, and a
        # policy that re-reads the prompt first (KVzip) gets a chunk's slots for the re-read
        self.rereads = config.compress == "after_prefill" and POLICIES[config.policy].rereads_prompt
        reread = config.chunk_size + len(config.reread_prefix) if self.rereads else 0
        held = prompt_len + reread if config.compress == "after_prefill" else 0
        self.states = [empty_state(batch, s.num_kv_heads, max(capacity, held) + reserve, s.head_dim, s.value_dim,
                                   s.dtype, device)
                       | (empty_tier(batch, s.num_kv_heads, blocks, s.head_dim, s.value_dim, s.tier_bits, s.tier_group,
                                     device) if s.tier_bits else {})
                       for s, capacity, blocks in zip(self.sites, self.capacities, self.tier_blocks)]

    @classmethod
    def for_graph(cls, graph_module: torch.fx.GraphModule, batch: int, seq_len: int,
                  device: torch.device | str = "cpu", reserve: int = 0, prompt_len: int = 0) -> KVCache:
        """A cache sized by the graph's ``CachePlan`` and bound to it."""
        plan = cache_plan(graph_module)
        cache = cls(plan.sites, plan.config, batch, seq_len, device, reserve, prompt_len)
        cache.bind(graph_module)
        return cache

    def first_layers(self, sites: Sequence[CacheSite]) -> KVCache:
        """A cache over this one's first ``len(sites)`` layers, sharing their tensors: the drafter of
        self-speculative decoding (the model's first blocks) reads and writes the full model's cache there
        (LayerSkip's shared cache). Take it after ``compress``, which replaces the tensors."""
        mine = [(s.layer, s.num_kv_heads, s.head_dim, s.value_dim) for s in self.sites[:len(sites)]]
        theirs = [(s.layer, s.num_kv_heads, s.head_dim, s.value_dim) for s in sites]
        if mine != theirs:
            raise DynasparseError(f"a cache over the first {len(sites)} layers must have this cache's first "
                                  f"layers: {theirs} against {mine}")
        view = object.__new__(KVCache)
        view.__dict__.update(self.__dict__)
        view.sites, view.states = tuple(sites), self.states[:len(sites)]
        view.capacities, view.tier_blocks = self.capacities[:len(sites)], self.tier_blocks[:len(sites)]
        return view

    def bind(self, graph_module: torch.fx.GraphModule) -> None:
        """Make these tensors the graph's cache buffers (the graph reads them by name on every call)."""
        for site, state in zip(self.sites, self.states):
            for field, tensor in state.items():
                setattr(graph_module, site.buffer(field), tensor)

    def rollback(self, keep: torch.Tensor) -> None:
        """Forget all but the first ``keep[b]`` tokens of each row b (drafts the full model rejected).

        Their slots become empty (position -1) and are the first reused. Exact as long as nothing was
        evicted since those tokens came in: the reserve slots and ``shrink`` see to that."""
        for state in self.states:
            state["positions"].masked_fill_(state["positions"] >= keep[:, None, None], -1)
            state["seen"].copy_(keep)
            if "cold_positions" in state:
                kv_tier.rollback(state, keep)

    def shrink(self) -> None:
        """Evict down to each layer's capacity, lowest priority first (the policy's scores; sinks and the
        recent window stay): run once the tokens in the reserve slots are final (verified drafts)."""
        for state, capacity, blocks in zip(self.states, self.capacities, self.tier_blocks):
            if not blocks:  # a tiered cache spills to its tier when a step needs room instead
                self._shrink_one(state, capacity)

    def compress(self) -> bool:
        """Evict down to each layer's budget once (``shrink``) and move what stays into caches of budget
        slots, kept slots first in their order; True when a layer was resized (rebind the new tensors).
        Run after the prompt with ``compress="after_prefill"``: the scores have read all of it."""
        resized = False
        for i, (site, state, capacity) in enumerate(zip(self.sites, self.states, self.capacities)):
            slots = capacity + self.reserve
            if state["keys"].shape[2] == slots + 1:
                continue
            if self.tier_blocks[i]:  # every full block past the sinks, the recent window and the pins: to the tier
                sink, recent = self.config.sink, self.config.recent
                kv_tier.pin(state, self._pins(site, capacity), sink, recent, state["seen"])
                kv_tier.spill(state, state, site.tier_bits, sink, recent, state["seen"], keep_last=self.config.window)
            self._shrink_one(state, capacity)
            order = (state["positions"] < 0).long().argsort(dim=-1, stable=True)[..., :slots]
            compact = {name: tensor for name, tensor in state.items() if name not in ("keys", "values", "positions",
                                                                                         "scores")}
            for name in ("keys", "values", "positions", "scores"):
                tensor = state[name]
                index = order if tensor.dim() == 3 else order[..., None].expand(*order.shape, tensor.shape[-1])
                kept = tensor.gather(2, index)
                scratch = torch.full_like(kept[:, :, :1], -1) if name == "positions" else torch.zeros_like(kept[:, :, :1])
                compact[name] = torch.cat([kept, scratch], dim=2)
            self.states[i] = {name: compact[name] for name in state}  # the op's order
            resized = True
        return resized

    def _pins(self, site: CacheSite, capacity: int) -> int:
        """Pinned slots of a tiered site: its hot slots beyond the unpinned ones."""
        return max(capacity - _unpinned_hot(site, self.config), 0)

    def _shrink_one(self, state: dict[str, torch.Tensor], capacity: int) -> None:
        positions = state["positions"]
        valid = positions >= 0
        excess = (valid.sum(-1, keepdim=True) - capacity).clamp(min=0)
        if not bool(excess.any()):
            return
        priority = priorities(state["scores"], positions, state["seen"], self.config.sink, self.config.recent)
        priority = priority.masked_fill(~valid, math.inf)
        rank = priority.sort(dim=-1, stable=True).indices.argsort(dim=-1)
        positions.masked_fill_(valid & (rank < excess), -1)

    @property
    def allocated_bytes(self) -> int:
        """Every byte the cache holds while decoding (fixed for the whole generation): each layer's keys,
        values, positions and scores, the scratch slot included."""
        return sum(tensor.nbytes for state in self.states for tensor in state.values())

    def held_bytes(self) -> int:
        """Bytes of the slots holding a token now (key, value, position, score; as ``used_bytes`` counts them,
        but counted on the device: one sync)."""
        hot = sum(int((state["positions"] >= 0).sum()) * slot_bytes(site) // site.num_kv_heads
                  for site, state in zip(self.sites, self.states))
        cold = sum(int((state["cold_positions"] >= 0).any(-1).sum()) * tier_bytes(site) // site.num_kv_heads
                   for site, state in zip(self.sites, self.states) if "cold_positions" in state)
        return hot + cold

    @property
    def full_bytes(self) -> int:
        """Bytes of K/V the full cache would hold for the same batch and sequence length."""
        return sum((s["keys"][..., :1, :].nbytes + s["values"][..., :1, :].nbytes) * self.seq_len for s in self.states)

    def used_bytes(self, real_tokens: list[int]) -> int:
        """Bytes of the slots holding a token (key, value, position, score), for rows that have taken in
        ``real_tokens`` tokens each: grows until a layer's cache is full, then stays. Computed on the host
        (no device sync)."""
        total = 0
        for site, capacity, blocks in zip(self.sites, self.capacities, self.tier_blocks):
            for n in real_tokens:
                if blocks and n > capacity:  # whole blocks past the sinks, the recent window and the pins left
                    left = (n - self.config.sink - self.config.recent - self._pins(site, capacity)) // site.tier_group
                    total += (n - left * site.tier_group) * slot_bytes(site) + min(blocks, left) * tier_bytes(site)
                else:
                    total += min(capacity, n) * slot_bytes(site)
        return total
