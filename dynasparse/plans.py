"""What passes leave on a graph module for the runtime, the exporter and the report: one plan per technique,
under its key in ``graph_module.meta``. Passes write them; the runtime and the exporters read them; neither
imports the other for it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import torch

from dynasparse.config import BaseConfig
from dynasparse.ir.nodes import InputSize, hint
from dynasparse.kernels import kv_cache, kv_tier

CACHE_META = "dynasparse_kv_cache"  # a CachePlan: the KV pass gave every attention site a bounded cache
EXIT_META = "dynasparse_exit"  # an ExitPlan: exit gates after blocks
MLP_SKIP_META = "dynasparse_mlp_skip"  # an MLPSkipPlan: routers in front of blocks' MLPs
MLP_WIDTH_META = "dynasparse_mlp_width"  # an MLPWidthPlan: thresholds in front of the matmuls of blocks' MLPs
DELAYED_KV_META = "dynasparse_delayed_kv"  # a DelayedKVPlan: a diffusion LM's blocks run on the active tokens
MERGE_GATE = "dynasparse.merge_gate"  # a MergeGate when TokenMergeConfig.dense_below is set
TIMESTEP_BANDS = "dynasparse.timestep_bands"  # TimestepBands when TokenMergeConfig.timestep_schedule is set
STREAM_STATE = "dynasparse_stream_state"  # values that travel with the residual stream, per block (see below)
KV_METADATA = "dynasparse.kv_cache"  # an exported decode step's file metadata: the config and the cache layout
EXIT_METADATA = "dynasparse.exit"  # an exported staged model's first file: the stage files and the exit logic


@dataclass(frozen=True)
class CacheSite:
    """One layer's cache as the runtime needs to allocate it."""

    layer: int
    prefix: str  # buffer names are f"{prefix}_{field}"
    policy: str
    num_kv_heads: int
    head_dim: int
    value_dim: int
    dtype: torch.dtype
    role: str = "all"  # "all" the layer's KV heads, or its "retrieval" / "streaming" group (head_scores)
    heads: tuple[int, ...] = ()  # with a role other than "all": the layer's KV heads this cache holds
    tier_bits: int = 0  # > 0: tokens leaving the cache are kept in a tier quantized to this many bits
    tier_group: int = 32  # the tier's block of tokens (keys) and group of channels (values)

    @property
    def fields(self) -> tuple[str, ...]:
        """The names of this cache's state tensors, in the order its op takes them."""
        return kv_cache.STATE_FIELDS + (kv_tier.TIER_FIELDS if self.tier_bits else ())

    def buffer(self, field: str) -> str:
        return f"{self.prefix}_{field}"


@dataclass(frozen=True)
class CachePlan:
    """What the KV pass left on the graph module: the config and one ``CacheSite`` per attention layer."""

    config: BaseConfig  # the KVEvictionConfig
    sites: tuple[CacheSite, ...]


@dataclass
class Gate:
    """One gate, by node name (names survive stage splitting and export)."""

    block: int
    hidden: str  # what the head reads (the block's output, or the tuned map of it)
    confidence: str
    prediction: str
    outputs: list[str]  # the head's outputs at this gate, in the graph's flat output order
    last: str  # the gate's last node: the staged runtime cuts the graph after it
    block_output: str = ""  # the block's output: the residual stream carried to the next block


@dataclass
class ExitPlan:
    """What the pass leaves on the graph module for the runtime and the report."""

    config: BaseConfig  # the ExitGateConfig
    gates: list[Gate]
    thresholds: list[float]
    num_blocks: int
    final_hidden: str  # the last block's output
    logits_index: int  # which flat output confidence is read from
    block_outputs: list[str] = field(default_factory=list)  # every block's output, in order
    curve: list[dict] = field(default_factory=list)  # calibration trade-off, one row per threshold tried


@dataclass
class MergeGate:
    """Which graph a call runs: the merged one, or ``dense`` (the graph before merging) when the batch
    holds fewer than ``dense_below`` mergeable tokens. Sizes are read from the flat inputs, in
    placeholder order: ``(input, dim)``, or ``(None, size)`` for a size fixed at capture."""

    dense: torch.fx.Graph
    batch_at: tuple[int | None, int]
    length_at: tuple[int | None, int]
    min_tokens: int
    dense_below: int

    def mergeable_tokens(self, flat_inputs: list) -> int:
        def read(at: tuple[int | None, int]) -> int:
            index, dim = at
            return dim if index is None else hint(flat_inputs[index].shape[dim])

        return read(self.batch_at) * max(read(self.length_at) - self.min_tokens, 0)

    def worth_merging(self, flat_inputs: list) -> bool:
        return self.mergeable_tokens(flat_inputs) >= self.dense_below


@dataclass
class TimestepBands:
    """Token density by denoising timestep: the flat input that carries the timestep, and per band the
    lowest timestep it covers, its keep ratio and the amount (``ratio_milli``) of each merge node, by name.
    After every pass, the graph is finished into one that picks the band from the timestep (torch.cond)."""

    timestep_at: int
    bands: list[tuple[float, float, dict[str, int]]]

    def keep_at(self, timestep: float) -> float:
        """The keep ratio of the band a step at ``timestep`` runs."""
        return self.bands[band_covering([low for low, _, _ in self.bands], timestep)][1]


def band_covering(lows: list[float], timestep: float) -> int:
    """Which band, given each band's lowest timestep (in any order), covers ``timestep``: the one with the
    highest lowest timestep at or below it (the graph's chooser, the sampler and calibration agree)."""
    return max((i for i, low in enumerate(lows) if low <= timestep), key=lambda i: lows[i])


@dataclass
class StreamState:
    """A value that changes with the residual stream from block to block (token merging's size and source
    state): ``final`` is what the graph reads after the last block, ``after_block[i]`` the value right after
    block i. A pass that makes the head read the stream early (an exit gate) reads ``after_block[i]``
    instead of ``final``, by node name."""

    final: str
    after_block: dict[int, str]


@dataclass
class MLPSkipPlan:
    """Routers in front of blocks' MLPs: the config, and each routed block's ``RoutedMLP`` submodule name."""

    config: BaseConfig
    modules: dict[int, str]


@dataclass(frozen=True)
class WidthSite:
    """One thresholded matmul input of a block's MLP: the ``ChannelThreshold`` submodule, the multiply-adds
    per token of the matmuls reading it (a zeroed share of its entries skips that share of them), and its
    depth (0: reads the MLP's input; 1: an inner activation, after a matmul)."""

    module: str
    macs: int
    depth: int


@dataclass
class MLPWidthPlan:
    """Per-token MLP width: the config, and each thresholded block's sites."""

    config: BaseConfig
    blocks: dict[int, list[WidthSite]]

    @property
    def sites(self) -> list[WidthSite]:
        return [site for sites in self.blocks.values() for site in sites]


@dataclass
class DelayedKVPlan:
    """dKV-Cache on a bidirectional model: the graph runs its blocks on the tokens at buffer ``index`` [B, A]
    and each attention site keeps keys and values in buffers ``caches[i]`` = (keys, values), shaped
    [B, kv_heads[i], L, head_dims[i]]. ``length`` reads L off a call's inputs. A head that reads every
    token reads buffer ``stream_cache`` [B, L, stream_dim], the last block's output with the active rows
    written in."""

    config: BaseConfig
    index: str
    caches: list[tuple[str, str]]
    kv_heads: list[int]
    head_dims: list[tuple[int, int]]  # (key dim, value dim) per site
    length: InputSize
    stream_cache: str | None = None
    stream_dim: int = 0
