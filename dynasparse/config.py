"""The config base: validated on construction, JSON round-trip, one pass per config type.

Follows torchao's ``quantize_(model, Config())``: users only see configs. Each technique's config lives
with its pass (``dynasparse/passes/<technique>.py``) and is made known here by ``@config_type``.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

from dynasparse.errors import DynasparseError


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

    def check_fitted(self, without: str) -> None:
        """Raise a DynasparseError unless ``fitted`` is None or a file (``without``: what leaving it out does)."""
        if self.fitted is not None and not Path(self.fitted).is_file():
            raise DynasparseError(f"{type(self).__name__}.fitted={self.fitted!r} is not a file; give the path "
                                  f"dynasparse.fit(..., save=PATH) wrote, or leave it out ({without})")

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


def as_tuple(value) -> tuple:
    """A config field that takes one value or a tuple of them, as a tuple."""
    return value if isinstance(value, tuple) else (value,)
