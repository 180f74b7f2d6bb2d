"""Block-sparse attention on CPU through compiled FlexAttention.

The gather path (``sparse_attention.sparse_attention_gather``) copies each kept KV block once per query block
that reads it; Inductor's C++ FlexAttention kernel reads the listed blocks in place, which measured about 1.5x
faster at 8k tokens. It compiles once per shape (seconds), so it serves long causal prompts without padding:
``usable`` says when, and everything else stays on the gather path.
"""
from __future__ import annotations

import functools
import warnings

import torch

from dynasparse.kernels.sparse_attention import last_query_positions, num_blocks, plan_block_mask, softmax_scale

MIN_KEYS = 4096  # below this the gather path is about as fast and needs no compile


def usable(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, block_size: int) -> bool:
    return (q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16) and k.shape[2] >= MIN_KEYS
            and q.shape[2] >= block_size and (mask is None or only_causal(mask, is_causal, q.shape[2], k.shape[2]))
            and _compiled() is not None)


def only_causal(mask: torch.Tensor, is_causal: bool, q_len: int, kv_len: int) -> bool:
    """True when a boolean ``mask`` hides nothing that causality does not: Hugging Face models pass their
    causal mask as a tensor even without padding, and then the kernel may drop it (one pass over it)."""
    return is_causal and mask.dtype == torch.bool and not mask.logical_not().tril(kv_len - q_len).any()


@functools.cache
def _compiled():
    """The compiled ``flex_attention``, or None where Inductor cannot build C++ here (then: gather)."""
    from torch.nn.attention.flex_attention import flex_attention

    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        get_cpp_compiler()
    except Exception as error:  # no C++ compiler: the gather path is exact too, only slower
        warnings.warn(f"block-sparse attention uses the gather path on CPU: Inductor has no C++ compiler ({error})")
        return None
    return torch.compile(flex_attention, dynamic=False)


def _as_lists(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., NK] bool → (counts, indices) with the listed blocks first, in ascending order."""
    order = torch.sort((~blocks).to(torch.int8), dim=-1, stable=True).indices
    return blocks.sum(-1, dtype=torch.int32), order.to(torch.int32)


def flex_block_mask(counts: torch.Tensor, indices: torch.Tensor, block_size: int, q_len: int, kv_len: int,
                    q_heads: int, is_causal: bool):
    """The plan as a ``BlockMask`` whose blocks wholly visible to their query block are *full* (no
    ``mask_mod`` call per score); only blocks the causal diagonal or the sequence end cuts are partial."""
    from torch.nn.attention.flex_attention import BlockMask

    nk = num_blocks(kv_len, block_size)
    listed = plan_block_mask(counts, indices, nk)
    block_end = (torch.arange(nk, device=counts.device) + 1) * block_size
    whole = block_end <= kv_len
    if is_causal:
        first_query = last_query_positions(q_len, kv_len, block_size, counts.device) - (block_size - 1)
        whole = whole & (block_end[None, :] - 1 <= first_query[:, None])
    offset = kv_len - q_len

    def causal(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    def in_range(b, h, q_idx, kv_idx):
        return kv_idx < kv_len

    groups = q_heads // counts.shape[1]  # lists per KV head, repeated for its query heads once sorted
    partial_counts, partial, full_counts, full = (t.repeat_interleave(groups, dim=1) for t in
                                                  (*_as_lists(listed & ~whole), *_as_lists(listed & whole)))
    return BlockMask.from_kv_blocks(partial_counts, partial, full_counts, full, BLOCK_SIZE=block_size,
                                    mask_mod=causal if is_causal else in_range, seq_lengths=(q_len, kv_len))


def sparse_attention_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, scale: float | None,
                          counts: torch.Tensor, indices: torch.Tensor, block_size: int) -> torch.Tensor:
    """Attention over the listed blocks; sequence-major [B, Lq, Hq, Dv] like ``dynasparse::attention``."""
    block_mask = flex_block_mask(counts, indices, block_size, q.shape[2], k.shape[2], q.shape[1], is_causal)
    out = _compiled()(q, k, v, block_mask=block_mask, scale=softmax_scale(scale, q.shape[-1]),
                      enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2).contiguous()
