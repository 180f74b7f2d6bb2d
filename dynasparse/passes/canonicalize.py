"""Canonicalize: every attention in the graph becomes one ``dynasparse::attention`` node.

    scaled_dot_product_attention(q, k, v, mask, is_causal, scale)         ─┐
    matmul(q, kᵀ) → ×scale → +mask → softmax → (dropout p=0) → matmul(·, v) ─┴→ dynasparse.attention(q, k, v, ...)

Grouped-query models repeat K/V before attention (unsqueeze → expand → reshape); with ``fold_repeat_kv``
the op reads the un-repeated K/V directly, so later passes select blocks and cache per KV head.
All later passes rewrite this one op instead of N attention spellings.
"""
from __future__ import annotations

import numbers
import sys

import torch
from torch.fx import Node

from dynasparse.config import CanonicalizeConfig
from dynasparse.ir.analysis import GraphAnalysis
from dynasparse.ir.nodes import aten, bound_args, copy_meta, fake, is_call, shape_of
from dynasparse.ir.ops import ATTENTION
from dynasparse.kernels.attention import softmax_scale
from dynasparse.registry import PassResult

_SOFTMAX = (aten.softmax.int, aten._softmax.default)
_PASSTHROUGH = (aten.to.dtype, aten._to_copy.default, aten.clone.default, aten.contiguous.default,
                aten.alias.default)
_DROPOUT = (aten.dropout.default,)
_RESHAPE = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)
_SLICE_END_OPEN = sys.maxsize // 2


class NotAttention(Exception):
    """The softmax is not an attention this pass can rewrite; the message says why."""


def _real_users(node: Node) -> list[Node]:
    """Users that consume the value (export adds ``_assert_tensor_metadata`` checks beside them)."""
    return [u for u in node.users if u.target is not aten._assert_tensor_metadata.default]


def _sole_user(node: Node) -> Node:
    users = _real_users(node)
    if len(users) != 1:
        raise NotAttention(f"{node.name} is used {len(users)} times (attention probabilities or scores "
                           "are read elsewhere, e.g. output_attentions=True)")
    return users[0]


def _remove_dead_code(gm: torch.fx.GraphModule) -> None:
    """DCE that also drops unused dropouts (random ops to FX, but the identity at inference); export's dtype
    asserts are gone by now (``_drop_runtime_checks``)."""
    while True:
        gm.graph.eliminate_dead_code()
        orphans = [n for n in gm.graph.nodes if not n.users and is_call(n, *_DROPOUT)]
        if not orphans:
            return
        for node in orphans:
            gm.graph.erase_node(node)


def _drop_runtime_checks(gm: torch.fx.GraphModule) -> None:
    """Export's dtype asserts, and casts to the dtype a value already has (an fp32 model's RMSNorm casts to
    fp32 and back): each is an op call per layer and step that computes nothing, which an eager decode step
    of a small model pays in Python."""
    for node in list(gm.graph.nodes):
        if node.target is aten._assert_tensor_metadata.default:
            gm.graph.erase_node(node)
        elif is_call(node, aten.to.dtype) and len(node.args) == 2 and not node.kwargs \
                and isinstance(node.args[0], Node) and isinstance(fake(node.args[0]), torch.Tensor) \
                and fake(node.args[0]).dtype == node.args[1]:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)


def _is_identity_slice(node: Node) -> bool:
    args = bound_args(node)
    return args.get("start") in (None, 0) and args.get("step", 1) == 1 and (
        args.get("end") is None or (isinstance(args.get("end"), int) and args["end"] >= _SLICE_END_OPEN))


def _unrepeated_kv(node: Node) -> Node:
    """Return the K/V before ``repeat_kv`` (unsqueeze(2) → expand → reshape), or ``node`` itself."""
    if not is_call(node, *_RESHAPE):
        return node
    expanded = node.args[0]
    if not is_call(expanded, aten.expand.default):
        return node
    source = expanded.args[0]
    while is_call(source, aten.slice.Tensor) and _is_identity_slice(source):
        source = source.args[0]
    if not (is_call(source, aten.unsqueeze.default) and source.args[1] == 2):
        return node
    source = source.args[0]
    while is_call(source, aten.slice.Tensor) and _is_identity_slice(source):
        source = source.args[0]
    before, after = shape_of(source), shape_of(node)
    if before is None or after is None or len(before) != 4 or len(after) != 4:
        return node
    if before[0] != after[0] or before[2:] != after[2:] or after[1] % before[1] != 0:
        return node
    return source


def _scores_chain(scores: Node) -> tuple[Node, Node, float, list[Node]]:
    """Walk back from the softmax input to ``matmul(q, kᵀ)``: returns (q, kᵀ, scale, masks)."""
    scale, masks = 1.0, []
    node = scores
    while True:
        if is_call(node, aten.matmul.default):
            q, k_t = node.args
            if len(shape_of(q) or ()) != 4:
                raise NotAttention(f"{node.name}: only 4-D [batch, heads, seq, dim] attention is rewritten")
            return q, k_t, scale, masks
        if is_call(node, *_PASSTHROUGH):
            node = node.args[0]
        elif is_call(node, aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar):
            a, b = node.args
            if not isinstance(b, numbers.Number):
                raise NotAttention(f"{node.name}: scale is a tensor, not a constant")
            scale = scale * b if node.target in (aten.mul.Tensor, aten.mul.Scalar) else scale / b
            node = a
        elif is_call(node, aten.add.Tensor) and len(node.args) == 2 and node.kwargs.get("alpha", 1) == 1:
            a, b = node.args
            score_side = a if _leads_to_matmul(a) else b
            mask = b if score_side is a else a
            if not isinstance(mask, Node) or not _leads_to_matmul(score_side):
                raise NotAttention(f"{node.name}: cannot tell the scores from the mask")
            masks.append(mask)
            node = score_side
        else:
            raise NotAttention(f"{getattr(node, 'name', node)}: unsupported op between matmul and softmax "
                               f"({getattr(node, 'target', node)})")
        if len(_real_users(node)) != 1:
            raise NotAttention(f"{node.name}: attention scores are read elsewhere")


def _leads_to_matmul(node) -> bool:
    while isinstance(node, Node):
        if is_call(node, aten.matmul.default):
            return True
        if not is_call(node, *_PASSTHROUGH, aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar,
                       aten.div.Scalar, aten.add.Tensor):
            return False
        node = node.args[0]
    return False


def _probs_chain(softmax: Node) -> Node:
    """Walk forward from the softmax to ``matmul(probs, v)``; dropout must be off (inference)."""
    previous, node = softmax, _sole_user(softmax)
    while not is_call(node, aten.matmul.default):
        if is_call(node, *_DROPOUT):
            args = bound_args(node)
            if args["train"] and args["p"] > 0:
                raise NotAttention(f"{node.name}: dropout p={args['p']} is active; call model.eval()")
        elif not is_call(node, *_PASSTHROUGH):
            raise NotAttention(f"{node.name}: unsupported op between softmax and matmul ({node.target})")
        previous, node = node, _sole_user(node)
    if node.args[0] is not previous:
        raise NotAttention(f"{node.name}: probabilities are not the left operand")
    return node


def _softmax_dim_is_last(node: Node) -> bool:
    dim, rank = node.args[1], len(shape_of(node) or ())
    return dim in (-1, rank - 1)


class CanonicalizePass:
    name = "canonicalize"

    def __init__(self, config: CanonicalizeConfig | None = None):
        self.config = config or CanonicalizeConfig()

    def apply(self, gm: torch.fx.GraphModule, analysis: GraphAnalysis | None = None) -> PassResult:
        result = PassResult(self.name)
        for node in list(gm.graph.nodes):
            if self.config.sdpa and is_call(node, aten.scaled_dot_product_attention.default):
                self._rewrite_sdpa(gm, node, result)
            elif self.config.handwritten and is_call(node, *_SOFTMAX) and _softmax_dim_is_last(node):
                self._rewrite_handwritten(gm, node, result)
        _drop_runtime_checks(gm)
        _remove_dead_code(gm)
        gm.graph.lint()
        gm.recompile()
        return result

    def _kv(self, node: Node) -> Node:
        return _unrepeated_kv(node) if self.config.fold_repeat_kv else node

    def _rewrite_sdpa(self, gm: torch.fx.GraphModule, node: Node, result: PassResult) -> None:
        args = bound_args(node)
        if args["dropout_p"]:
            result.left_dense[node.name] = (f"scaled_dot_product_attention with dropout_p={args['dropout_p']}; "
                                            "call model.eval() before optimize()")
            return
        k, v = args["key"], args["value"]
        if not args["enable_gqa"]:
            k, v = self._kv(k), self._kv(v)
        scale, head_dim = args["scale"], fake(args["query"]).shape[-1]
        if scale is None and isinstance(head_dim, int):  # resolved once here: every later op reads a number
            scale = softmax_scale(None, head_dim)
        self._replace(gm, node, (args["query"], k, v, args["attn_mask"], args["is_causal"], scale), result, "sdpa")

    def _rewrite_handwritten(self, gm: torch.fx.GraphModule, softmax: Node, result: PassResult) -> None:
        try:
            q, k_t, scale, masks = _scores_chain(softmax.args[0])
        except NotAttention:
            return  # a softmax that is not attention (e.g. a classifier head): nothing to report
        try:
            out = _probs_chain(softmax)
        except NotAttention as why:
            result.left_dense[softmax.name] = str(why)
            return
        with gm.graph.inserting_before(out):
            if is_call(k_t, aten.transpose.int) and sorted(a % 4 for a in k_t.args[1:]) == [2, 3]:
                k = k_t.args[0]
            else:
                k = gm.graph.call_function(aten.transpose.int, (k_t, -2, -1))
            mask = masks[0] if masks else None
            for extra in masks[1:]:
                mask = gm.graph.call_function(aten.add.Tensor, (mask, extra))
        self._replace(gm, out, (q, self._kv(k), self._kv(out.args[1]), mask, False, float(scale)),
                      result, "matmul-softmax")

    @staticmethod
    def _replace(gm: torch.fx.GraphModule, old: Node, args: tuple, result: PassResult, kind: str) -> None:
        with gm.graph.inserting_before(old):
            new = gm.graph.call_function(ATTENTION, args)
            heads_major = gm.graph.call_function(aten.transpose.int, (new, 1, 2))
        copy_meta(old, new)
        copy_meta(old, heads_major)
        new.meta["val"] = old.meta["val"].transpose(1, 2).contiguous()
        old.replace_all_uses_with(heads_major)
        gm.graph.erase_node(old)
        q, k = fake(args[0]), fake(args[1])
        gqa = f", GQA {q.shape[1]}/{k.shape[1]} heads" if q.shape[1] != k.shape[1] else ""
        result.num_matches += 1
        result.applied.append(f"{new.name} ← {kind}{gqa}")
