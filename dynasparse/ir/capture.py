"""Capture: an ``nn.Module`` plus example inputs become an FX graph (torch.export, non-strict).

Every dimension of every tensor input is captured as ``Dim.AUTO``: dynamic where the model allows it,
specialized where the model pins it (image size, channels). Two things are handled generically:

* A batch of one would be specialized by export's 0/1 rule, so the example batch is repeated to two
  before capture; the captured graph then accepts any batch size.
* Hugging Face decoders return a KV cache object by default. dynasparse owns the cache (the KV-eviction
  pass and the generate loop), so models whose config has ``use_cache`` are captured with it off.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.export import Dim
from torch.utils import _pytree as pytree

from dynasparse.errors import DynasparseError


@dataclass
class Captured:
    """A captured graph and what capture had to decide to get it."""

    graph_module: torch.fx.GraphModule
    example_args: tuple
    example_kwargs: dict[str, Any]
    dynamic_shapes: Any
    notes: list[str] = field(default_factory=list)


def _check_inputs(model: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Fail before tracing when the inputs cannot bind to ``forward``: export's own error is opaque."""
    try:
        inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as err:
        params = ", ".join(inspect.signature(model.forward).parameters)
        raise DynasparseError(
            f"example inputs do not match {type(model).__name__}.forward({params}): {err}. "
            "Pass example_inputs=(...) / example_kwargs={...} the way you call the model."
        ) from None
    if not any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves((args, kwargs))):
        raise DynasparseError(
            f"no tensor among the example inputs of {type(model).__name__}; "
            "pass example_inputs=(tensor, ...) or example_kwargs={'input_ids': tensor, ...}."
        )


def batch_of_two(args: tuple, kwargs: dict) -> tuple[tuple, dict, bool]:
    """Repeat a batch of one to two so export keeps the batch dimension dynamic."""
    tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.ndim > 0]
    if not tensors or any(t.shape[0] != 1 for t in tensors):
        return args, kwargs, False

    def grow(x):
        return x.expand(2, *x.shape[1:]).contiguous() if isinstance(x, torch.Tensor) and x.ndim > 0 else x

    args, kwargs = pytree.tree_map(grow, (args, kwargs))
    return args, kwargs, True


def _auto_dims(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """``Dim.AUTO`` on every dimension of every tensor input, keyed by ``forward``'s parameter names."""
    def spec(x):
        return {i: Dim.AUTO for i in range(x.ndim)} if isinstance(x, torch.Tensor) else None

    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    return {name: pytree.tree_map(spec, value) for name, value in bound.arguments.items()}


def _capture_error(model: torch.nn.Module, args: tuple, kwargs: dict, err: Exception) -> DynasparseError:
    """Tell a model that rejects its example inputs apart from a model export cannot trace."""
    try:
        model(*args, **kwargs)
    except Exception as eager_err:  # noqa: BLE001 - the model's own complaint is the message
        return DynasparseError(
            f"example inputs do not match the model: {type(model).__name__} itself raised "
            f"{type(eager_err).__name__}: {eager_err}. Pass example_inputs / example_kwargs the way you "
            "call the model.")
    return DynasparseError(
        f"torch.export could not capture {type(model).__name__}: {type(err).__name__}: "
        f"{str(err).splitlines()[0][:400]}. dynasparse needs a model that torch.export can trace "
        "(non-strict); the error names the construct it could not trace.")


@contextlib.contextmanager
def _cache_disabled(model: torch.nn.Module, notes: list[str]):
    config = getattr(model, "config", None)
    if not getattr(config, "use_cache", False):
        yield
        return
    config.use_cache = False
    notes.append("captured with config.use_cache=False: dynasparse owns the KV cache")
    try:
        yield
    finally:
        config.use_cache = True


def capture(model: torch.nn.Module, example_args: tuple = (), example_kwargs: dict | None = None) -> Captured:
    """torch.export the model (non-strict) with dynamic dims where possible; return the unlifted graph."""
    if not isinstance(model, torch.nn.Module):
        raise DynasparseError(f"expected a torch.nn.Module, got {type(model).__name__}")
    example_kwargs = dict(example_kwargs or {})
    example_args = tuple(example_args) if isinstance(example_args, (tuple, list)) else (example_args,)
    _check_inputs(model, example_args, example_kwargs)
    notes: list[str] = []
    # a sliced (non-contiguous) example would leave the graph's guards tied to its strides: later calls
    # with ordinary tensors then fail inside the guards
    example_args, example_kwargs = pytree.tree_map(
        lambda x: x.contiguous() if isinstance(x, torch.Tensor) else x, (example_args, example_kwargs))
    args, kwargs, grew = batch_of_two(example_args, example_kwargs)
    if grew:
        notes.append("example batch of 1 repeated to 2 so the batch dimension stays dynamic")
    model = model.eval()
    with _cache_disabled(model, notes), torch.no_grad():
        dynamic = _auto_dims(model, args, kwargs)
        try:
            program = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic, strict=False)
        except Exception as err:  # noqa: BLE001 - any export failure falls back to static shapes
            notes.append(f"dynamic capture failed ({type(err).__name__}: {str(err).splitlines()[0][:160]}); "
                         "captured with static shapes")
            dynamic = None
            try:
                program = torch.export.export(model, args, kwargs, strict=False)
            except Exception as err2:
                raise _capture_error(model, args, kwargs, err2) from err2
    return Captured(program.module(), example_args, example_kwargs, dynamic, notes)
