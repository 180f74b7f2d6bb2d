"""Config dataclasses: validated on construction, JSON round-trip, one pass per config type.

Follows torchao's ``quantize_(model, Config())``: users only see configs; ``register_pass`` maps each
config type to the pass that applies it.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, ClassVar

from dynasparse.errors import DynasparseError
from dynasparse.kernels.kv_cache import POLICIES
from dynasparse.kernels.exit_gate import CRITERIA, DEFAULT_THRESHOLDS
from dynasparse.kernels.sparse_attention import ESTIMATORS


@dataclasses.dataclass
class BaseConfig:
    """Base of every dynasparse config. ``layers`` restricts a pass to those attention-layer indices."""

    layers: tuple[int, ...] | None = None
    version: ClassVar[int] = 1

    def __post_init__(self) -> None:
        if self.layers is not None:
            self.layers = tuple(self.layers)
            bad = [i for i in self.layers if not isinstance(i, int) or i < 0]
            if bad:
                raise DynasparseError(f"{type(self).__name__}.layers must be layer indices >= 0, got {bad}")

    def check_range(self, name: str, low: float, high: float, *, low_open: bool = False,
                    high_open: bool = False) -> None:
        """Raise a DynasparseError naming the field, its value and the allowed interval."""
        value = getattr(self, name)
        ok = (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
        if not ok:
            lo, hi = "(" if low_open else "[", ")" if high_open else "]"
            raise DynasparseError(f"{type(self).__name__}.{name}={value!r} is out of range; "
                                  f"expected a value in {lo}{low}, {high}{hi}")

    def check_int(self, name: str, low: int) -> None:
        """Raise a DynasparseError unless the field is an int (not a bool) >= ``low``."""
        value = getattr(self, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise DynasparseError(f"{type(self).__name__}.{name}={value!r} must be an int >= {low}")

    def applies_to(self, layer: int | None) -> bool:
        return self.layers is None or layer in self.layers

    def to_dict(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "version": self.version, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BaseConfig:
        """Build the config named by ``data['type']`` (or ``cls``); unknown fields are an error."""
        data = dict(data)
        name = data.pop("type", cls.__name__)
        data.pop("version", None)
        target = _CONFIG_TYPES.get(name)
        if target is None:
            raise DynasparseError(f"unknown config type {name!r}; known: {sorted(_CONFIG_TYPES)}")
        fields = {f.name for f in dataclasses.fields(target)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise DynasparseError(f"{name} has no field(s) {unknown}; valid fields: {sorted(fields)}")
        return target(**data)

    @classmethod
    def from_json(cls, text: str) -> BaseConfig:
        return cls.from_dict(json.loads(text))


_CONFIG_TYPES: dict[str, type[BaseConfig]] = {}


def config_type(cls: type[BaseConfig]) -> type[BaseConfig]:
    """Class decorator: make a config known to ``from_dict`` / ``from_json``."""
    _CONFIG_TYPES[cls.__name__] = cls
    return cls


@config_type
@dataclasses.dataclass
class CanonicalizeConfig(BaseConfig):
    """What the always-on canonicalize pass rewrites into ``dynasparse::attention``.

    ``sdpa``: calls of ``scaled_dot_product_attention``; ``handwritten``: the matmul → scale → mask →
    softmax → matmul pattern; ``fold_repeat_kv``: attend to the un-repeated K/V of grouped-query attention
    (later passes then select and cache per KV head).
    """

    sdpa: bool = True
    handwritten: bool = True
    fold_repeat_kv: bool = True


@config_type
@dataclasses.dataclass
class TokenMergeConfig(BaseConfig):
    """Merge redundant tokens between attention and MLP of encoder blocks (ToMe / DyMU / EViT family).

    How many: ``r`` tokens per block (an int, or one int per merged block) or ``keep_ratio``, the share
    of tokens left after the last merge (spread geometrically over the blocks). ``schedule="decreasing"``
    ramps a constant ``r`` from 2r down to 0 (ToMe's decreasing schedule, same total).
    Which: ``mode="bipartite"`` merges the most similar pairs (cosine of ``metric``: the keys averaged
    over heads, or the ``hidden`` state); ``"threshold"`` merges pairs above a per-block similarity
    ``threshold`` (None: calibrated from ``optimize(..., calibration=...)`` to hit the same average),
    always at least ``min_merge_fraction`` of the scheduled merges so buffers stay fixed-size;
    ``"prune"`` drops the least-attended tokens (CLS attention), fused into one token when ``fuse_pruned``.
    ``protect``: real-token positions never merged (CLS). ``proportional_attention``: keys of merged
    tokens get log(size) added to their logits. ``min_tokens`` (with keep_ratio): each row merges only a
    share of its tokens beyond the first ``min_tokens``, so short inputs (queries) stay exact.
    ``dense_below``: a call whose batch holds fewer mergeable tokens than this (batch size × (padded
    length − ``min_tokens``)) runs the graph as it was before merging. Each merge has a fixed cost
    (many small ops), so small batches lose time unless they skip merging.
    ``layers``: blocks to merge after (default: all).
    """

    r: int | tuple[int, ...] | None = None
    keep_ratio: float | None = None
    schedule: str = "constant"
    mode: str = "bipartite"
    metric: str = "keys"
    protect: tuple[int, ...] = (0,)
    proportional_attention: bool = True
    threshold: float | tuple[float, ...] | None = None
    min_merge_fraction: float = 0.5
    fuse_pruned: bool = True
    min_tokens: int = 0
    dense_below: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if (self.r is None) == (self.keep_ratio is None):
            raise DynasparseError(f"{name}: set exactly one of r (tokens merged per block) or keep_ratio "
                                  "(share of tokens left after the last block)")
        if isinstance(self.r, (list, tuple)):
            self.r = tuple(self.r)
        if self.r is not None and any(not isinstance(v, int) or v < 0 for v in _as_tuple(self.r)):
            raise DynasparseError(f"{name}.r={self.r!r} must be a non-negative int or a list of them")
        if self.keep_ratio is not None:
            self.check_range("keep_ratio", 0.0, 1.0, low_open=True)
        for field_name, allowed in (("schedule", ("constant", "decreasing")),
                                    ("mode", ("bipartite", "threshold", "prune")),
                                    ("metric", ("keys", "hidden"))):
            if getattr(self, field_name) not in allowed:
                raise DynasparseError(f"{name}.{field_name}={getattr(self, field_name)!r}; expected one of {allowed}")
        if self.schedule == "decreasing" and not isinstance(self.r, int):
            raise DynasparseError(f"{name}: schedule='decreasing' ramps a constant r; give r as an int")
        self.protect = tuple(self.protect)
        if any(not isinstance(p, int) or p < 0 for p in self.protect):
            raise DynasparseError(f"{name}.protect={self.protect!r} must be token positions >= 0")
        self.check_range("min_merge_fraction", 0.0, 1.0)
        self.check_int("min_tokens", 0)
        self.check_int("dense_below", 0)
        if self.min_tokens and self.keep_ratio is None:
            raise DynasparseError(f"{name}: min_tokens goes with keep_ratio (a share of the tokens beyond it)")
        if self.threshold is not None:
            self.threshold = self.threshold if isinstance(self.threshold, float) else tuple(self.threshold)
            if any(not -1.0 <= t <= 1.0 for t in _as_tuple(self.threshold)):
                raise DynasparseError(f"{name}.threshold={self.threshold!r}: cosine thresholds lie in [-1, 1]")
            if self.mode != "threshold":
                raise DynasparseError(f"{name}: threshold is only used with mode='threshold'")


@config_type
@dataclasses.dataclass
class SparseAttentionConfig(BaseConfig):
    """Attend only to the KV blocks that matter, chosen per input (MInference / SeerAttention / FlexPrefill).

    How many blocks each query block keeps: exactly one of ``keep_ratio`` (a share of its causally valid
    blocks), ``top_k`` (a number of blocks) or ``mass`` (the fewest blocks holding that share of the
    estimated attention mass). ``sink_blocks`` leading blocks and ``local_blocks`` blocks ending at the
    diagonal are always kept and count toward the amount. ``estimator`` scores blocks: ``"pooled"``
    (mean-pooled Q · K), ``"vertical_slash"`` (the last ``window`` queries' real attention, read along
    columns and diagonals) or ``"streaming"`` (the blocks nearest the diagonal: StreamingLLM's A-shape).
    Sequences with fewer than ``min_seq_len`` keys run dense. ``layers``: attention layers to sparsify.
    """

    keep_ratio: float | None = None
    top_k: int | None = None
    mass: float | None = None
    estimator: str = "pooled"
    block_size: int = 64
    sink_blocks: int = 1
    local_blocks: int = 1
    min_seq_len: int = 1024
    window: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        given = [f for f in ("keep_ratio", "top_k", "mass") if getattr(self, f) is not None]
        if len(given) != 1:
            raise DynasparseError(f"{name}: set exactly one of keep_ratio (share of each row's blocks), top_k "
                                  f"(blocks per row) or mass (share of the estimated attention mass); got "
                                  f"{given or 'none'}")
        if self.keep_ratio is not None:
            self.check_range("keep_ratio", 0.0, 1.0, low_open=True)
        if self.mass is not None:
            self.check_range("mass", 0.0, 1.0, low_open=True)
        if self.estimator not in ESTIMATORS:
            raise DynasparseError(f"{name}.estimator={self.estimator!r}; expected one of {ESTIMATORS}")
        if not isinstance(self.block_size, int) or self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise DynasparseError(f"{name}.block_size={self.block_size!r}: blocks are kernel tiles, so the size "
                                  "must be a power of two >= 16 (64 or 128 are the usual choices)")
        for field_name in ("sink_blocks", "local_blocks", "min_seq_len"):
            self.check_int(field_name, 0)
        if not isinstance(self.window, int) or self.window < 1:
            raise DynasparseError(f"{name}.window={self.window!r} must be an int >= 1 (probe queries)")
        if self.top_k is not None:
            self.check_int("top_k", 1)
            if self.top_k * self.block_size > max(self.min_seq_len, self.block_size):
                raise DynasparseError(
                    f"{name}.top_k={self.top_k} blocks of {self.block_size} tokens is more than a sequence of "
                    f"min_seq_len={self.min_seq_len} tokens has; set min_seq_len >= "
                    f"{self.top_k * self.block_size} or lower top_k")

    @property
    def selector(self) -> str:
        return "keep_ratio" if self.keep_ratio is not None else "topk" if self.top_k is not None else "mass"

    @property
    def amount(self) -> float:
        return float(self.keep_ratio if self.keep_ratio is not None else self.top_k or self.mass)


@config_type
@dataclasses.dataclass
class KVEvictionConfig(BaseConfig):
    """A bounded KV cache for decoders, owned by the runtime (H2O / StreamingLLM / TOVA / SnapKV).

    ``policy``: ``"full"`` (no eviction: the reference), ``"streaming"`` (sinks + recent window),
    ``"h2o"`` (accumulated attention mass), ``"tova"`` (the newest query's attention) or ``"snapkv"``
    (the last ``window`` queries of each chunk, pooled over ``pool`` neighbouring keys).
    ``budget``: cached tokens per layer, as an int, a share of the sequence (prompt + new tokens) as a
    float in (0, 1], or one value per layer. ``schedule="pyramid"`` spreads the same total as a linear
    ramp from 1.5x the budget at the first layer to 0.5x at the last (PyramidKV). ``sink`` first tokens
    and the ``recent`` newest tokens are never evicted. ``chunk_size``: prompt tokens per prefill step
    (eviction runs after each chunk, so prefill memory is bounded too). ``layers``: layers that evict
    (the others keep a full cache).
    """

    policy: str = "h2o"
    budget: int | float | tuple = 0.2
    sink: int = 4
    recent: int = 32
    schedule: str = "uniform"
    window: int = 32
    pool: int = 5
    chunk_size: int = 512

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if self.policy not in POLICIES:
            raise DynasparseError(f"{name}.policy={self.policy!r} is not a known policy; expected one of "
                                  f"{sorted(POLICIES)}")
        if self.schedule not in ("uniform", "pyramid"):
            raise DynasparseError(f"{name}.schedule={self.schedule!r}; expected 'uniform' or 'pyramid'")
        for field_name, low in (("sink", 0), ("recent", 0), ("window", 1), ("pool", 1), ("chunk_size", 1)):
            self.check_int(field_name, low)
        if isinstance(self.budget, list):
            self.budget = tuple(self.budget)
        for value in _as_tuple(self.budget):
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
        if self.schedule == "pyramid" and isinstance(self.budget, tuple):
            raise DynasparseError(f"{name}: schedule='pyramid' spreads one budget over the layers; "
                                  "give budget as one int or float, or give per-layer budgets without it")

    def capacities(self, num_layers: int, seq_len: int) -> list[int]:
        """Cache slots per layer for a sequence of ``seq_len`` tokens (never more than it needs)."""
        budgets = list(self.budget) if isinstance(self.budget, tuple) else [self.budget] * num_layers
        if len(budgets) != num_layers:
            raise DynasparseError(f"{type(self).__name__}.budget has {len(budgets)} values for a model with "
                                  f"{num_layers} attention layers; give one per layer")
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


def _as_tuple(value) -> tuple:
    return value if isinstance(value, tuple) else (value,)


@config_type
@dataclasses.dataclass
class ExitGateConfig(BaseConfig):
    """Exit gates after transformer blocks (DeeBERT / PABEE / CALM / LayerSkip family).

    ``after_blocks``: block indices to gate after (default: every block but the last). At a gate, the
    model's own final norm + head read the hidden state (``head="model"``, as LayerSkip does), or the same
    head behind an affine map fitted on calibration data (``head="tuned"``). A row leaves when its
    ``criterion`` confidence is strictly above ``threshold`` (one value, or one per gate):
    ``max_prob``, ``margin`` (top-2 probability gap), ``entropy`` (1 - entropy / log V), ``saturation``
    (cosine of the hidden state with the block's input, CALM), ``patience`` (the prediction has not changed
    for ``patience`` gates, PABEE, and its max probability is above ``threshold``). Every confidence is at
    most 1, so ``threshold=1.0`` never exits. Confidence is read from the model's first output as logits
    over its last dimension; a row with several positions exits when all of them are confident.

    ``threshold=None`` takes the criterion's default, or with ``max_quality_drop`` (share of calibration
    rows whose prediction may change) or ``target_speedup`` (estimated from blocks run) is chosen on
    ``optimize(..., calibration=...)``.

    ``mode``: ``staged`` (rows leave the batch at each gate, the rest continue compacted), ``whole_batch``
    (one graph, ``torch.cond`` exits when every row is confident; exports to ONNX ``If``), ``draft`` (the
    model cut after its single gate: the drafter of self-speculative decoding; ``draft_tokens`` is where
    the draft length starts, it then adapts to how many drafts the full model accepts).
    """

    after_blocks: tuple[int, ...] | None = None
    criterion: str = "max_prob"
    threshold: float | tuple | None = None
    head: str = "model"
    patience: int = 2
    mode: str = "staged"
    max_quality_drop: float | None = None
    target_speedup: float | None = None
    draft_tokens: int = 4
    decode_schedule: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if self.decode_schedule is not None:
            self.decode_schedule = tuple(self.decode_schedule)
            if (len(self.decode_schedule) != 2 or any(not isinstance(b, int) or isinstance(b, bool) or b < 1
                                                      for b in self.decode_schedule)
                    or self.decode_schedule[0] < self.decode_schedule[1]):
                raise DynasparseError(f"{name}.decode_schedule={self.decode_schedule!r}: give (blocks for the first "
                                      "generated token, blocks for the last), ints >= 1, not increasing")
        self.check_int("draft_tokens", 1)
        if self.layers is not None:
            raise DynasparseError(f"{name} gates blocks: give after_blocks=(...) instead of layers")
        if self.after_blocks is not None:
            self.after_blocks = tuple(self.after_blocks)
            if (not self.after_blocks or any(not isinstance(b, int) or isinstance(b, bool) or b < 0
                                             for b in self.after_blocks)):
                raise DynasparseError(f"{name}.after_blocks={self.after_blocks!r} must be block indices >= 0")
            if list(self.after_blocks) != sorted(set(self.after_blocks)):
                raise DynasparseError(f"{name}.after_blocks={self.after_blocks!r} must be increasing, without "
                                      "repeats")
        if self.criterion not in CRITERIA:
            raise DynasparseError(f"{name}.criterion={self.criterion!r} is not a known criterion; expected one "
                                  f"of {list(CRITERIA)}")
        if self.head not in ("model", "tuned"):
            raise DynasparseError(f"{name}.head={self.head!r}; expected 'model' (the model's own head) or "
                                  "'tuned' (an affine map before it, fitted on calibration data)")
        if self.mode not in ("staged", "whole_batch", "draft"):
            raise DynasparseError(f"{name}.mode={self.mode!r}; expected 'staged', 'whole_batch' or 'draft'")
        self.check_int("patience", 1)
        if isinstance(self.threshold, list):
            self.threshold = tuple(self.threshold)
        for value in _as_tuple(self.threshold) if self.threshold is not None else ():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise DynasparseError(f"{name}.threshold={self.threshold!r}: confidences lie in [0, 1]; give "
                                      "values in [0, 1] (1.0 never exits)")
        targets = [f for f in ("max_quality_drop", "target_speedup") if getattr(self, f) is not None]
        if len(targets) > 1:
            raise DynasparseError(f"{name}: give max_quality_drop or target_speedup, not both")
        if targets and self.threshold is not None:
            raise DynasparseError(f"{name}: {targets[0]} chooses the threshold on calibration data; "
                                  "drop threshold= or the target")
        if self.max_quality_drop is not None:
            self.check_range("max_quality_drop", 0.0, 1.0, high_open=True)
        if self.target_speedup is not None and not self.target_speedup > 1.0:
            raise DynasparseError(f"{name}.target_speedup={self.target_speedup!r} must be > 1")
        if self.mode == "draft" and (self.after_blocks is None or len(self.after_blocks) != 1):
            raise DynasparseError(f"{name}(mode='draft') cuts the model after one block: give "
                                  "after_blocks=(index,)")
        if self.mode == "whole_batch" and self.criterion == "patience":
            raise DynasparseError(f"{name}(mode='whole_batch'): the patience criterion carries state from gate "
                                  "to gate per row; use mode='staged' or another criterion")

    @property
    def calibrates(self) -> bool:
        return self.head == "tuned" or self.max_quality_drop is not None or self.target_speedup is not None

    def thresholds(self, num_gates: int) -> list[float]:
        """One threshold per gate (the criterion's default when none was given or calibrated)."""
        if self.threshold is None:
            return [DEFAULT_THRESHOLDS[self.criterion]] * num_gates
        values = list(_as_tuple(self.threshold))
        if len(values) == 1:
            return values * num_gates
        if len(values) != num_gates:
            raise DynasparseError(f"{type(self).__name__}.threshold has {len(values)} values for {num_gates} "
                                  "gates; give one value or one per gate")
        return [float(v) for v in values]
