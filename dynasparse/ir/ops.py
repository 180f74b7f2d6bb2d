"""The dynasparse op set, as ``torch.library`` custom ops.

Custom ops are opaque to torch.export, torch.compile and the ONNX exporter: each stays one node that a
pass can find, a backend can lower, and ``dynasparse.export`` translates to standard ONNX ops.
Every op has a fake (shape) implementation and dispatches to a kernel in ``dynasparse.kernels``.
"""
from __future__ import annotations

from typing import Callable

import torch

from dynasparse.kernels import (delayed_kv, exit_gate, kv_cache, kv_cache_sparse, kv_tier, mlp_skip, mlp_width,
                               query_aware,
                               sparse_attention, sparse_attention_cpu, token_merge, token_sparse)
from dynasparse.kernels.attention import attention_sdpa, key_validity, key_visibility
from dynasparse.kernels.blocks import num_blocks
from dynasparse.kernels.policies import POLICIES

_LIBRARY = torch.library.Library("dynasparse", "DEF")


def dynasparse_op(name: str, *, mutates_args: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Define ``dynasparse::<name>`` from a type-hinted function, as ``torch.library.custom_op`` does, but
    registered on the dispatcher directly: an eager call then costs microseconds instead of tens of them,
    which a decode step pays once per layer. Returns the op; ``torch.library.register_fake(op)`` gives its
    shapes."""
    def define(fn: Callable) -> Callable:
        _LIBRARY.define(name + torch.library.infer_schema(fn, mutates_args=mutates_args))
        _LIBRARY.impl(name, fn, "CompositeExplicitAutograd")
        op = getattr(torch.ops.dynasparse, name).default
        _IMPLEMENTATIONS[op] = fn
        return op
    return define


_IMPLEMENTATIONS: dict[torch._ops.OpOverload, Callable] = {}


def cuda_kernel(op: torch._ops.OpOverload) -> Callable[[Callable], Callable]:
    """Register ``fn`` as ``op``'s CUDA kernel (as ``torch.library.register_kernel(op, "cuda")`` does): the
    dispatcher picks it for CUDA tensors, the torch implementation runs everywhere else. The kernels import
    triton inside, so a CPU-only install never does."""
    def register(fn: Callable) -> Callable:
        _LIBRARY.impl(op._schema.name.split("::")[1], fn, "CUDA")
        return fn
    return register


def implementation(op: torch._ops.OpOverload) -> Callable:
    """The torch function behind ``op``: what ONNX export traces in its place where it has static shapes."""
    return _IMPLEMENTATIONS[op]


@dynasparse_op("attention")
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              is_causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """Canonical attention; see ``dynasparse.kernels.attention`` for the exact semantics.

    Returns **sequence-major** [B, Lq, Hq, Dv], contiguous: what fused kernels write anyway, so the usual
    ``out.transpose(1, 2).reshape(B, L, -1)`` that follows attention costs no copy (the canonicalize pass
    puts a ``transpose(1, 2)`` view after the op to keep the graph's [B, Hq, Lq, Dv] contract).
    """
    return attention_sdpa(q, k, v, mask, is_causal, scale).transpose(1, 2).contiguous()


@torch.library.register_fake(attention)
def _attention_fake(q, k, v, mask=None, is_causal=False, scale=None):
    torch._check(q.shape[1] % k.shape[1] == 0, lambda: "query heads must be a multiple of kv heads")
    return q.new_empty(q.shape[0], q.shape[2], q.shape[1], v.shape[-1])


def _attention_setup(ctx, inputs, output) -> None:
    q, k, v, mask, is_causal, scale = inputs
    ctx.save_for_backward(q, k, v, mask)
    ctx.is_causal, ctx.scale = is_causal, scale


def _attention_backward(ctx, grad: torch.Tensor):
    """SDPA's own backward, recomputed: ``dynasparse.fit`` trains gates through a frozen model's attention."""
    q, k, v, mask = ctx.saved_tensors
    inputs = [t.detach().requires_grad_(t.requires_grad) for t in (q, k, v)]
    with torch.enable_grad():
        out = attention_sdpa(*inputs, mask, ctx.is_causal, ctx.scale).transpose(1, 2)
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad) if wanted else [])
    return *(next(grads) if t.requires_grad else None for t in inputs), None, None, None


torch.library.register_autograd(attention, _attention_backward, setup_context=_attention_setup)
ATTENTION = torch.ops.dynasparse.attention.default


# --- token merging (dynasparse.kernels.token_merge has the semantics) -------------------------------------------

@dynasparse_op("merge_init")
def merge_init(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge state of an unmerged sequence: size 1 per real token (0 for padding), source = identity
    (padding encoded as ``-(position + 1)``)."""
    batch, length = x.shape[0], x.shape[1]
    valid = key_validity(mask, batch, length, x.device)
    position = torch.arange(length, device=x.device).expand(batch, length)
    return valid.float(), torch.where(valid, position, -position - 1)


@torch.library.register_fake(merge_init)
def _merge_init_fake(x, mask):
    return x.new_empty(x.shape[:2], dtype=torch.float32), x.new_empty(x.shape[:2], dtype=torch.long)


@dynasparse_op("merge_tokens")
def merge_tokens(x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor, source: torch.Tensor,
                 importance: torch.Tensor | None, r: int, ratio_milli: int, protect: list[int], mode: str,
                 threshold: float, r_min_milli: int, fuse: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One merge step over [B, L, H] tokens; returns (x, size, source) with fewer slots."""
    return token_merge.merge_tokens_reference(x, metric, size, source, importance, r=r, ratio_milli=ratio_milli,
                                              protect=list(protect), mode=mode, threshold=threshold,
                                              r_min_milli=r_min_milli, fuse=fuse)


@torch.library.register_fake(merge_tokens)
def _merge_tokens_fake(x, metric, size, source, importance, r, ratio_milli, protect, mode, threshold,
                       r_min_milli, fuse):
    capacity = token_merge.merged_capacity(x.shape[1], r, ratio_milli, mode, fuse, r_min_milli, len(protect))
    return (x.new_empty(x.shape[0], capacity, x.shape[2]), size.new_empty(size.shape[0], capacity),
            torch.empty_like(source))


@dynasparse_op("merge_bias")
def merge_bias(size: torch.Tensor, like: torch.Tensor, proportional: bool) -> torch.Tensor:
    """[B, 1, 1, L] additive attention bias for merged keys, in ``like``'s dtype."""
    if proportional:
        return token_merge.attention_bias(size, like.dtype)
    return token_merge.attention_bias((size > 0).to(size.dtype), like.dtype)


@torch.library.register_fake(merge_bias)
def _merge_bias_fake(size, like, proportional):
    return size.new_empty(size.shape[0], 1, 1, size.shape[1], dtype=like.dtype)


@dynasparse_op("unmerge")
def unmerge(x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Back to the original length: each original position reads the slot that holds it."""
    return token_merge.unmerge_reference(x, source)


@torch.library.register_fake(unmerge)
def _unmerge_fake(x, source):
    return x.new_empty(x.shape[0], source.shape[1], x.shape[2])


@dynasparse_op("cls_importance")
def cls_importance(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float | None,
                   cls_index: int) -> torch.Tensor:
    """[B, L]: attention of the CLS query to each key, averaged over heads (EViT's token importance).

    One query row against all keys: O(L·D), so pruning never needs the attention matrix.
    """
    return token_merge.cls_importance_reference(q, k, bias, scale, cls_index)


@torch.library.register_fake(cls_importance)
def _cls_importance_fake(q, k, bias, scale, cls_index):
    return q.new_empty(q.shape[0], k.shape[2], dtype=torch.float32)


MERGE_INIT = torch.ops.dynasparse.merge_init.default
MERGE_TOKENS = torch.ops.dynasparse.merge_tokens.default
MERGE_BIAS = torch.ops.dynasparse.merge_bias.default
UNMERGE = torch.ops.dynasparse.unmerge.default
CLS_IMPORTANCE = torch.ops.dynasparse.cls_importance.default


# --- block-sparse attention (dynasparse.kernels.sparse_attention has the semantics) ------------------------

@dynasparse_op("block_plan")
def block_plan(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
               scale: float | None, block_size: int, estimator: str, selector: str, amount: float,
               sink_blocks: int, local_blocks: int, min_seq_len: int, window: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimate block scores and select blocks: the plan (counts [B, Hkv, NQ], indices [B, Hkv, NQ, NK])."""
    return sparse_attention.build_plan(q, k, mask, is_causal, scale, block_size, estimator, selector, amount,
                                       sink_blocks, local_blocks, min_seq_len, window)


@cuda_kernel(block_plan)
def _block_plan_cuda(q, k, mask, is_causal, scale, block_size, estimator, selector, amount, sink_blocks,
                     local_blocks, min_seq_len, window):
    if estimator == "pooled" and k.shape[2] >= min_seq_len and num_blocks(k.shape[2], block_size) <= 4096:
        from dynasparse.kernels import sparse_attention_triton

        return sparse_attention_triton.pooled_plan(q, k, mask, is_causal, scale, block_size, selector, amount,
                                                   sink_blocks, local_blocks)
    return sparse_attention.build_plan(q, k, mask, is_causal, scale, block_size, estimator, selector, amount,
                                       sink_blocks, local_blocks, min_seq_len, window)


@torch.library.register_fake(block_plan)
def _block_plan_fake(q, k, mask, is_causal, scale, block_size, estimator, selector, amount, sink_blocks,
                     local_blocks, min_seq_len, window):
    nq = (q.shape[2] + block_size - 1) // block_size
    nk = (k.shape[2] + block_size - 1) // block_size
    return (q.new_empty(q.shape[0], k.shape[1], nq, dtype=torch.int32),
            q.new_empty(q.shape[0], k.shape[1], nq, nk, dtype=torch.int32))


@dynasparse_op("block_sparse_attention")
def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                           counts: torch.Tensor, indices: torch.Tensor, is_causal: bool, scale: float | None,
                           block_size: int, min_seq_len: int, decode_keep: float = 1.0) -> torch.Tensor:
    """Attention over the plan's blocks; sequence-major [B, Lq, Hq, Dv] like ``dynasparse::attention``.

    Keys shorter than ``min_seq_len``, and plans that keep every reachable block, run dense SDPA. Fewer
    queries than a block (decoding) read the top ``decode_keep`` share of the keys (query-aware). Prompts
    without padding on CPU run the C++ kernel that reads the listed blocks in place; the rest gathers them.
    """
    if k.shape[2] < min_seq_len:
        return attention(q, k, v, mask, is_causal, scale)
    if decode_keep < 1.0 and q.shape[2] < block_size:
        visible = key_visibility(mask, is_causal, q.shape[2], k.shape[2], q.device)
        keep = q.new_full((q.shape[0],), decode_keep, dtype=torch.float32)
        return query_aware.query_aware_attention(q, k, v, visible, scale, keep)[0]
    if sparse_attention.keeps_every_block(counts, q.shape[2], k.shape[2], block_size, is_causal):
        return attention(q, k, v, mask, is_causal, scale)
    if sparse_attention_cpu.usable(q, k, mask, is_causal, block_size):
        return sparse_attention_cpu.sparse_attention_cpu(q, k, v, is_causal, scale, counts, indices, block_size)
    return sparse_attention.sparse_attention_gather(q, k, v, mask, is_causal, scale, counts, indices, block_size)


@cuda_kernel(block_sparse_attention)
def _block_sparse_attention_cuda(q, k, v, mask, counts, indices, is_causal, scale, block_size, min_seq_len,
                                 decode_keep=1.0):
    if k.shape[2] < min_seq_len or (decode_keep < 1.0 and q.shape[2] < block_size):
        return block_sparse_attention(q, k, v, mask, counts, indices, is_causal, scale, block_size, min_seq_len,
                                      decode_keep)
    from dynasparse.kernels import sparse_attention_triton

    kernel = (sparse_attention_triton.block_sparse_decode_triton if q.shape[2] <= block_size
              else sparse_attention_triton.block_sparse_attention_triton)
    return kernel(q, k, v, mask, is_causal, scale, counts, indices, block_size)


@torch.library.register_fake(block_sparse_attention)
def _block_sparse_attention_fake(q, k, v, mask, counts, indices, is_causal, scale, block_size, min_seq_len,
                                 decode_keep=1.0):
    return q.new_empty(q.shape[0], q.shape[2], q.shape[1], v.shape[-1])


@dynasparse_op("token_sparse_attention")
def token_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                           is_causal: bool, scale: float | None, keep: float, window: int,
                           min_seq_len: int) -> torch.Tensor:
    """Per KV head, attention among the ``keep`` share of tokens its probe queries weigh most, scattered
    back (zeros elsewhere); sequence-major [B, L, Hq, Dv] as the canonical op."""
    return token_sparse.token_sparse_attention(q, k, v, mask, is_causal, scale, keep, window, min_seq_len)


@torch.library.register_fake(token_sparse_attention)
def _token_sparse_attention_fake(q, k, v, mask, is_causal, scale, keep, window, min_seq_len):
    return q.new_empty(q.shape[0], q.shape[2], q.shape[1], v.shape[-1])


TOKEN_SPARSE_ATTENTION = torch.ops.dynasparse.token_sparse_attention.default
BLOCK_PLAN = torch.ops.dynasparse.block_plan.default
BLOCK_SPARSE_ATTENTION = torch.ops.dynasparse.block_sparse_attention.default


# --- bounded KV cache (dynasparse.kernels.kv_cache has the semantics) ----------------------------------------

@dynasparse_op("kv_cache_attention", mutates_args=("keys", "values", "positions", "scores", "seen"))
def kv_cache_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                       is_causal: bool, scale: float | None, keys: torch.Tensor, values: torch.Tensor,
                       positions: torch.Tensor, scores: torch.Tensor, seen: torch.Tensor, policy: str, sink: int,
                       recent: int, window: int, pool: int) -> torch.Tensor:
    """Attention of new tokens over a fixed-capacity cache, which it then updates in place (score, evict,
    write). Sequence-major [B, T, Hq, Dv] like ``dynasparse::attention``."""
    return kv_cache.kv_cache_step(q, k, v, mask, is_causal, scale, keys, values, positions, scores, seen, policy,
                                  sink, recent, window, pool)


@cuda_kernel(kv_cache_attention)
def _kv_cache_attention_cuda(q, k, v, mask, is_causal, scale, keys, values, positions, scores, seen, policy, sink,
                             recent, window, pool):
    if q.shape[2] == 1 and POLICIES[policy].reduce == "sum":  # a decode step: the fused Triton kernel
        from dynasparse.kernels import kv_cache_triton

        return kv_cache_triton.kv_cache_decode_step(q, k, v, mask, is_causal, scale, keys, values, positions,
                                                    scores, seen, policy, sink, recent)
    return kv_cache.kv_cache_step(q, k, v, mask, is_causal, scale, keys, values, positions, scores, seen, policy,
                                  sink, recent, window, pool)


@torch.library.register_fake(kv_cache_attention)
def _kv_cache_attention_fake(q, k, v, mask, is_causal, scale, keys, values, positions, scores, seen, policy,
                             sink, recent, window, pool):
    return q.new_empty(q.shape[0], q.shape[2], q.shape[1], v.shape[-1])


@dynasparse_op("kv_cache_attention_functional")
def kv_cache_attention_functional(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
        scale: float | None, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
        scores: torch.Tensor, seen: torch.Tensor, policy: str, sink: int, recent: int, window: int, pool: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same step returning the updated cache instead of writing it: the form that exports, with the
    cache as explicit graph inputs and outputs."""
    return kv_cache.kv_cache_step_functional(q, k, v, mask, is_causal, scale, keys, values, positions, scores,
                                             seen, policy, sink, recent, window, pool)


@torch.library.register_fake(kv_cache_attention_functional)
def _kv_cache_attention_functional_fake(q, k, v, mask, is_causal, scale, keys, values, positions, scores, seen,
                                        policy, sink, recent, window, pool):
    out = q.new_empty(q.shape[0], q.shape[2], q.shape[1], v.shape[-1])
    return (out, torch.empty_like(keys), torch.empty_like(values), torch.empty_like(positions),
            torch.empty_like(scores), torch.empty_like(seen))


@dynasparse_op("kv_cache_sparse_attention", mutates_args=("keys", "values", "positions", "scores", "seen"))
def kv_cache_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                              is_causal: bool, scale: float | None, keys: torch.Tensor, values: torch.Tensor,
                              positions: torch.Tensor, scores: torch.Tensor, seen: torch.Tensor, policy: str,
                              sink: int, recent: int, window: int, pool: int, block_size: int, estimator: str,
                              selector: str, amount: float, sink_blocks: int, local_blocks: int, min_seq_len: int,
                              plan_window: int, decode_keep: float) -> torch.Tensor:
    """``kv_cache_attention`` at a block-sparse site: prefill chunks long enough read the cache and the chunk
    through a block-sparse plan, decode steps the keys their queries weigh most
    (``dynasparse.kernels.kv_cache_sparse``)."""
    return kv_cache_sparse.kv_cache_sparse_step(q, k, v, mask, is_causal, scale, keys, values, positions, scores,
                                                seen, policy, sink, recent, window, pool, block_size, estimator,
                                                selector, amount, sink_blocks, local_blocks, min_seq_len,
                                                plan_window, decode_keep)


@torch.library.register_fake(kv_cache_sparse_attention)
def _kv_cache_sparse_attention_fake(q, k, v, mask, is_causal, scale, keys, values, positions, scores, seen, *plan):
    return q.new_empty(q.shape[0], q.shape[2], q.shape[1], v.shape[-1])


TIER_STATE = kv_cache.STATE_FIELDS + kv_tier.TIER_FIELDS


@dynasparse_op("kv_tiered_attention", mutates_args=TIER_STATE)
def kv_tiered_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                        is_causal: bool, scale: float | None, keys: torch.Tensor, values: torch.Tensor,
                        positions: torch.Tensor, scores: torch.Tensor, seen: torch.Tensor, cold_keys: torch.Tensor,
                        cold_key_scale: torch.Tensor, cold_key_min: torch.Tensor, cold_values: torch.Tensor,
                        cold_value_scale: torch.Tensor, cold_value_min: torch.Tensor, cold_positions: torch.Tensor,
                        cold_scores: torch.Tensor, policy: str, sink: int, recent: int, window: int, pool: int,
                        bits: int, read: float) -> torch.Tensor:
    """``kv_cache_attention`` over a cache with a compressed tier: tokens that leave the hot slots are kept
    quantized and read back by a query-aware block selection (``dynasparse.kernels.kv_tier``)."""
    return kv_tier.tiered_step(kv_cache_attention, q, k, v, mask, is_causal, scale,
                               [keys, values, positions, scores, seen],
                               [cold_keys, cold_key_scale, cold_key_min, cold_values, cold_value_scale, cold_value_min,
                                cold_positions, cold_scores], policy, sink, recent, window, pool, bits, read)


@torch.library.register_fake(kv_tiered_attention)
def _kv_tiered_attention_fake(q, k, v, *rest):
    return q.new_empty(q.shape[0], q.shape[2], q.shape[1], v.shape[-1])


@dynasparse_op("kv_tiered_sparse_attention", mutates_args=TIER_STATE)
def kv_tiered_sparse_attention(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
        scale: float | None, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, scores: torch.Tensor,
        seen: torch.Tensor, cold_keys: torch.Tensor, cold_key_scale: torch.Tensor, cold_key_min: torch.Tensor,
        cold_values: torch.Tensor, cold_value_scale: torch.Tensor, cold_value_min: torch.Tensor,
        cold_positions: torch.Tensor, cold_scores: torch.Tensor, policy: str, sink: int, recent: int, window: int,
        pool: int, bits: int, read: float, block_size: int, estimator: str, selector: str, amount: float,
        sink_blocks: int, local_blocks: int, min_seq_len: int, plan_window: int, decode_keep: float) -> torch.Tensor:
    """``kv_tiered_attention`` at a block-sparse site: the prompt is read block-sparse into the hot slots
    (``kv_cache_sparse_attention``) before anything leaves them."""
    return kv_tier.tiered_step(kv_cache_sparse_attention, q, k, v, mask, is_causal, scale,
                               [keys, values, positions, scores, seen],
                               [cold_keys, cold_key_scale, cold_key_min, cold_values, cold_value_scale, cold_value_min,
                                cold_positions, cold_scores], policy, sink, recent, window, pool, bits, read,
                               (block_size, estimator, selector, amount, sink_blocks, local_blocks, min_seq_len,
                                plan_window, decode_keep))


@torch.library.register_fake(kv_tiered_sparse_attention)
def _kv_tiered_sparse_attention_fake(q, k, v, *rest):
    return q.new_empty(q.shape[0], q.shape[2], q.shape[1], v.shape[-1])


KV_CACHE_ATTENTION = torch.ops.dynasparse.kv_cache_attention.default
KV_CACHE_ATTENTION_FUNCTIONAL = torch.ops.dynasparse.kv_cache_attention_functional.default
KV_CACHE_SPARSE_ATTENTION = torch.ops.dynasparse.kv_cache_sparse_attention.default
KV_TIERED_ATTENTION = torch.ops.dynasparse.kv_tiered_attention.default
KV_TIERED_SPARSE_ATTENTION = torch.ops.dynasparse.kv_tiered_sparse_attention.default


# --- exit gates (dynasparse.kernels.exit_gate has the semantics) -------------------------------------------------

@dynasparse_op("exit_confidence")
def exit_confidence(logits: torch.Tensor, hidden: torch.Tensor, previous: torch.Tensor, criterion: str
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence [B] in fp32, prediction = argmax of ``logits``) of an exit gate; rows exit where the
    confidence is above the gate's threshold."""
    return exit_gate.gate_confidence(logits, hidden, previous, criterion)


@torch.library.register_fake(exit_confidence)
def _exit_confidence_fake(logits, hidden, previous, criterion):
    return (logits.new_empty(logits.shape[0], dtype=torch.float32),
            logits.new_empty(logits.shape[:-1], dtype=torch.long))


EXIT_CONFIDENCE = torch.ops.dynasparse.exit_confidence.default


@dynasparse_op("learned_exit")
def learned_exit(logits: torch.Tensor, previous: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence [B] in fp32, prediction = argmax of ``logits``) of a learned exit gate (JEI-DNN): a
    logistic map of the exit's and the previous exit's logits, fitted by ``dynasparse.fit``."""
    return exit_gate.learned_confidence(logits, previous, weight, bias)


@torch.library.register_fake(learned_exit)
def _learned_exit_fake(logits, previous, weight, bias):
    return _exit_confidence_fake(logits, previous, previous, "learned")


LEARNED_EXIT = torch.ops.dynasparse.learned_exit.default


# --- MLP skipping (dynasparse.kernels.mlp_skip has the semantics) ------------------------------------------------

@dynasparse_op("token_route")
def token_route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Boolean [...] of ``x`` [..., D]: the tokens that run the block's MLP (router logit > 0)."""
    return mlp_skip.route_reference(x, weight, bias)


@torch.library.register_fake(token_route)
def _token_route_fake(x, weight, bias):
    return x.new_empty(x.shape[:-1], dtype=torch.bool)


TOKEN_ROUTE = torch.ops.dynasparse.token_route.default


# --- MLP width (dynasparse.kernels.mlp_width has the semantics) --------------------------------------------------

@dynasparse_op("channel_sparsify")
def channel_sparsify(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``x`` with entries of magnitude below ``threshold`` zeroed: the channels a token's matmul skips."""
    return mlp_width.sparsify(x, threshold)


@torch.library.register_fake(channel_sparsify)
def _channel_sparsify_fake(x, threshold):
    return torch.empty_like(x)


@dynasparse_op("row_sparse_linear")
def row_sparse_linear(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None,
                      threshold: torch.Tensor) -> torch.Tensor:
    """``channel_sparsify(x, threshold) @ weight_t + bias``, reading only the weight rows of the channels
    kept where that pays (a decode step on CPU)."""
    return mlp_width.row_sparse_linear(x, weight_t, bias, threshold)


@torch.library.register_fake(row_sparse_linear)
def _row_sparse_linear_fake(x, weight_t, bias, threshold):
    return x.new_empty(*x.shape[:-1], weight_t.shape[1])


CHANNEL_SPARSIFY = torch.ops.dynasparse.channel_sparsify.default
ROW_SPARSE_LINEAR = torch.ops.dynasparse.row_sparse_linear.default


# --- dKV-Cache for diffusion LMs (dynasparse.kernels.delayed_kv has the semantics) -------------------------------

@dynasparse_op("gather_active")
def gather_active(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The active tokens of the stream: ``hidden`` [B or 1, L, D] at positions ``index`` [B, A]."""
    return delayed_kv.gather_active(hidden, index)


@torch.library.register_fake(gather_active)
def _gather_active_fake(hidden, index):
    return hidden.new_empty(index.shape[0], index.shape[1], hidden.shape[2])


@dynasparse_op("cached_attention", mutates_args=("key_cache", "value_cache"))
def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     key_cache: torch.Tensor, value_cache: torch.Tensor, index: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """Bidirectional attention of the active queries over cached keys, the active ones written first."""
    return delayed_kv.cached_attention(q, k, v, mask, key_cache, value_cache, index, scale)


@torch.library.register_fake(cached_attention)
def _cached_attention_fake(q, k, v, mask, key_cache, value_cache, index, scale=None):
    return q.new_empty(q.shape[0], q.shape[2], q.shape[1], v.shape[-1])


@dynasparse_op("scatter_active", mutates_args=("cache",))
def scatter_active(active: torch.Tensor, cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The whole stream for a head that reads every token: the active rows written into the stream's cache."""
    return delayed_kv.scatter_active(active, cache, index)


@torch.library.register_fake(scatter_active)
def _scatter_active_fake(active, cache, index):
    return active.new_empty(cache.shape[0], cache.shape[1], active.shape[2])


GATHER_ACTIVE = torch.ops.dynasparse.gather_active.default
CACHED_ATTENTION = torch.ops.dynasparse.cached_attention.default
SCATTER_ACTIVE = torch.ops.dynasparse.scatter_active.default
