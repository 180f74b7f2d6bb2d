"""Fitted gate parameters on disk: a safetensors file and a JSON layout beside it (``path`` + ``.json``).

The layout names every fitted module and the shape of each of its tensors, so a file fitted on another
model or config is refused with the mismatch named instead of loading into the wrong gates. Passes that
insert trainable gates (``mlp_skip``, learned ``exit_gate``) save and load through here.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dynasparse.config import BaseConfig
from dynasparse.errors import DynasparseError


def save_fitted(path: str | Path, modules: dict[str, dict[str, torch.Tensor]], config: BaseConfig,
                extra: dict | None = None) -> Path:
    """Write ``modules`` (module name -> tensor name -> tensor), and beside them their layout, the config
    they were fitted under (its ``fitted`` field left out) and ``extra`` (JSON)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"{name}.{key}": t.detach().contiguous().cpu() for name, tensors in modules.items()
               for key, t in tensors.items()}, str(path))
    settings = {k: v for k, v in config.to_dict().items() if k != "fitted"}
    layout = {"config": settings, **(extra or {}), "modules": shapes(modules)}
    path.with_name(path.name + ".json").write_text(json.dumps(layout, indent=1))
    return path


def shapes(modules: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, list[int]]]:
    return {name: {key: list(t.shape) for key, t in tensors.items()} for name, tensors in modules.items()}


def load_fitted(path: str | Path, modules: dict[str, dict[str, torch.Tensor]]) -> dict:
    """Copy the saved tensors into ``modules`` (in place) and return the saved layout; a file whose modules
    or shapes differ from ``modules`` is refused, naming the difference."""
    path = Path(path)
    layout_path = path.with_name(path.name + ".json")
    if not layout_path.is_file():
        raise DynasparseError(f"{layout_path} is missing: fitted gates are a safetensors file and the JSON "
                              "dynasparse.fit wrote beside it")
    saved, mine = json.loads(layout_path.read_text()), shapes(modules)
    if saved["modules"] != mine:
        missing = sorted(set(saved["modules"]) ^ set(mine))
        other = sorted(n for n in set(saved["modules"]) & set(mine) if saved["modules"][n] != mine[n])
        first = (other or [""])[0]
        raise DynasparseError(f"{path} was fitted on another model or config: gates only on one side: {missing}; "
                              f"gates of other shapes: {other} (saved {saved['modules'].get(first)}, here "
                              f"{mine.get(first)})")
    tensors = load_file(str(path))
    with torch.no_grad():
        for name, own in modules.items():
            for key, t in own.items():
                t.copy_(tensors[f"{name}.{key}"].to(t.device, t.dtype))
    return saved
