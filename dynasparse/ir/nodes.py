"""Reading FX nodes of an aten-level graph: bound arguments, fake values, module paths."""
from __future__ import annotations

import contextlib
import copy
import re
import warnings
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch.fx import Node

aten = torch.ops.aten


def bound_args(node: Node) -> dict[str, Any]:
    """The node's arguments by schema name, defaults filled in (aten and custom ops alike)."""
    schema = node.target._schema
    out: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
    return out


def fake(node: Any) -> torch.Tensor | None:
    """The FakeTensor export recorded for the node, if it is a tensor node."""
    val = node.meta.get("val") if isinstance(node, Node) else None
    return val if isinstance(val, torch.Tensor) else None


def shape_of(node: Any) -> tuple | None:
    val = fake(node)
    return tuple(val.shape) if val is not None else None


def is_call(node: Any, *targets) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


_DYNAMO_ROOT = re.compile(r"^L\[['\"]self['\"]\]\.?")


def module_paths(node: Node) -> list[str]:
    """Module paths enclosing the node, outermost first (from ``nn_module_stack``).

    torch.export writes ``encoder.layer.0``; Dynamo writes ``L['self'].encoder.layer[0]``: both are
    read as the former.
    """
    stack = node.meta.get("nn_module_stack") or {}
    paths = (re.sub(r"\[(\d+)\]", r".\1", _DYNAMO_ROOT.sub("", path)) for path, _ in stack.values())
    return [path for path in paths if path]


_INDEXED = re.compile(r"^(.*\.)?(\d+)$")


def block_path(node: Node) -> str | None:
    """The innermost enclosing module whose path ends in an index: ``layers.3``, ``encoder.layer.0``."""
    for path in reversed(module_paths(node)):
        if _INDEXED.match(path):
            return path
    return None


def layer_index(path: str | None) -> int | None:
    match = _INDEXED.match(path or "")
    return int(match.group(2)) if match else None


def copy_meta(src: Node, dst: Node) -> None:
    """Keep the provenance (module stack, stack trace) and value of a replaced node."""
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack", "val", "tensor_meta"):
        if key in src.meta:
            dst.meta[key] = src.meta[key]


def hint(size) -> int:
    """The example value behind a (possibly symbolic) size: what the dimension was at capture."""
    if isinstance(size, torch.SymInt):
        return int(size.node.hint) if size.node.hint is not None else 1
    return int(size)


def is_size(value: Any, symbol: torch.SymInt) -> bool:
    """Whether ``value`` is the symbolic size ``symbol`` (the same expression): how a dynamic dimension, such
    as the sequence length, is recognised wherever the graph reads it."""
    return isinstance(value, torch.SymInt) and value.node.expr == symbol.node.expr


_VIEW_LIKE = (torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default,
              torch.ops.aten.expand.default)


def _static_token_slots(node: Node, length: int) -> list[int]:
    """Positions of a view-like shape that carry a static token count ``length``: equal to it where the input
    has it too, never the batch (first) or feature (last) position, where an equal size is a coincidence."""
    shape, source = node.args[1], fake(node.args[0])
    if not isinstance(shape, (list, tuple)) or source is None:
        return []
    return [i for i, size in enumerate(shape[:-1])
            if i > 0 and size == length and i < source.dim() and source.shape[i] == length]


def repoint_token_count(node: Node, length: int | torch.SymInt, count: Node) -> None:
    """Make ``node`` read ``count`` (the ``sym_size`` of a shortened sequence) where it read the input's token
    count ``length``: a dynamic length by its symbol anywhere in the arguments, a length the capture fixed in
    the token positions of a view-like shape. How a pass that shortens the sequence (token merging, the
    active tokens of a denoising step) fixes shapes such as ``view(x, [B, L, H, D])`` downstream of it."""
    if isinstance(length, torch.SymInt):
        def repoint(arg):
            return count if isinstance(arg, Node) and is_size(arg.meta.get("val"), length) else arg

        node.args = torch.fx.node.map_arg(node.args, repoint)
        node.kwargs = torch.fx.node.map_arg(node.kwargs, repoint)
    elif node.target in _VIEW_LIKE and (slots := _static_token_slots(node, length)):
        shape = list(node.args[1])
        for i in slots:
            shape[i] = count
        node.args = (node.args[0], shape, *node.args[2:])


def input_dim(gm: torch.fx.GraphModule, size: torch.SymInt) -> tuple[int, int] | None:
    """(flat input index, dimension) of the first graph input that has the symbolic ``size`` as a
    dimension: where a runtime reads that size off a call's inputs. None where no input has it."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for index, node in enumerate(placeholders):
        value = fake(node)
        for dim, dim_size in enumerate(value.shape if isinstance(value, torch.Tensor) else ()):
            if is_size(dim_size, size):
                return index, dim
    return None


@dataclass(frozen=True)
class InputSize:
    """A size as the inputs of a call give it: ``expression`` (a sympy expression, or an int where the capture
    fixed it) over the symbols ``dims`` reads ((symbol, flat input index, dimension) each): a DiT's token
    count is (H // p) * (W // p) of its latents' shape."""

    expression: Any
    dims: tuple[tuple[Any, int, int], ...]

    def of(self, flat_inputs: list) -> int:
        if not self.dims:
            return int(self.expression)
        return int(self.expression.xreplace({symbol: flat_inputs[index].shape[dim]
                                             for symbol, index, dim in self.dims}))


def input_size(gm: torch.fx.GraphModule, size: int | torch.SymInt) -> InputSize | None:
    """How to read ``size`` off a call's inputs; None where one of its symbols is on no input."""
    if not isinstance(size, torch.SymInt):
        return InputSize(int(size), ())
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    dims = []
    for symbol in size.node.expr.free_symbols:
        found = next(((index, dim) for index, node in enumerate(placeholders)
                      for dim, dim_size in enumerate(getattr(fake(node), "shape", ()))
                      if isinstance(dim_size, torch.SymInt) and dim_size.node.expr == symbol), None)
        if found is None:
            return None
        dims.append((symbol, *found))
    return InputSize(size.node.expr, tuple(dims))


def propagate_fake_values(gm: torch.fx.GraphModule) -> None:
    """Recompute every node's ``meta['val']`` after a rewrite changed shapes (e.g. fewer tokens).

    Runs the graph on the capture's own fake inputs and shape environment, so symbolic sizes stay symbolic;
    a rewrite that made shapes inconsistent fails here, at optimize time, not at the user's first call.
    """
    from torch._guards import detect_fake_mode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = [n.meta.get("val") for n in placeholders]
    mode = detect_fake_mode([v for v in inputs if isinstance(v, torch.Tensor)])
    allow = mode.allow_non_fake_inputs
    mode.allow_non_fake_inputs = True  # parameters and buffers are real tensors on the module
    try:
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*inputs)
    finally:
        mode.allow_non_fake_inputs = allow


GraphLike = TypeVar("GraphLike", torch.fx.Graph, torch.fx.GraphModule)


@contextlib.contextmanager
def quiet_pytree_notice():
    """Copying an export graph's pytree spec (our copies, and torch.onnx.export's own) makes torch print a
    deprecation notice about its internals that is not the user's to act on: silence that one notice."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        yield


def copy_graph(graph: GraphLike) -> GraphLike:
    """A deep copy of a graph or graph module."""
    with quiet_pytree_notice():
        return copy.deepcopy(graph)
