"""Block-sparse attention on CPU through a small C++ kernel (``sparse_attention_cpu.cpp``).

The gather path (``sparse_attention.sparse_attention_gather``) copies each kept KV block once per query block
that reads it, and compiled FlexAttention runs one 64x64 GEMM and one softmax update per block; this kernel
reads the listed blocks in place, scores up to 8 of them side by side and updates the softmax once for all,
as SDPA's CPU flash kernel does over dense blocks. It builds once per machine (about 30 s; PyTorch caches it
under ``~/.cache/torch_extensions``) and serves unpadded prompts: ``usable`` says when; everything else, and
every machine without a C++ compiler, stays on the gather path.
"""
from __future__ import annotations

from pathlib import Path

import torch

from dynasparse.kernels.cpu_extension import built
from dynasparse.kernels.sparse_attention import softmax_scale

SOURCE = Path(__file__).with_name("sparse_attention_cpu.cpp")


def usable(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, block_size: int) -> bool:
    """CPU, a floating dtype, no mask beyond causality, and a kernel that built here."""
    return (q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and q.shape[2] >= block_size and (mask is None or only_causal(mask, is_causal, q.shape[2], k.shape[2]))
            and _kernel() is not None)


def only_causal(mask: torch.Tensor, is_causal: bool, q_len: int, kv_len: int) -> bool:
    """True when a boolean ``mask`` hides nothing that causality does not: Hugging Face models pass their
    causal mask as a tensor even without padding, and then the kernel may drop it (one pass over it)."""
    return is_causal and mask.dtype == torch.bool and not mask.logical_not().tril(kv_len - q_len).any()


def _kernel():
    """The built op, or None where it cannot build here (then: the gather path, with a warning)."""
    if not built("dynasparse_cpu", SOURCE, "block-sparse attention's gather path"):
        return None
    return torch.ops.dynasparse_cpu.block_sparse_attention


def sparse_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, scale: float | None,
                         counts: torch.Tensor, indices: torch.Tensor, block_size: int) -> torch.Tensor:
    """Attention over the listed blocks; sequence-major [B, Lq, Hq, Dv] like ``dynasparse::attention``
    (computed in fp32, returned in ``q``'s dtype)."""
    out = _kernel()(q.float(), k.float(), v.float(), counts, indices, block_size, is_causal,
                    softmax_scale(scale, q.shape[-1]))
    return out.to(q.dtype)
