"""The dynasparse op set, as ``torch.library`` custom ops.

Custom ops are opaque to torch.export, torch.compile and the ONNX exporter: each stays one node that a
pass can find, a backend can lower, and ``dynasparse.export`` translates to standard ONNX ops.
Every op has a fake (shape) implementation and dispatches to a kernel in ``dynasparse.kernels``.
"""
from __future__ import annotations

import torch

from dynasparse.kernels.attention import attention_sdpa


@torch.library.custom_op("dynasparse::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              is_causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """Canonical attention; see ``dynasparse.kernels.attention`` for the exact semantics.

    The output is contiguous [B, Hq, Lq, Dv] whatever layout the kernel chose, so the fake impl (and
    Inductor's stride checks) hold on every backend.
    """
    return attention_sdpa(q, k, v, mask, is_causal, scale).contiguous()


@attention.register_fake
def _attention_fake(q, k, v, mask=None, is_causal=False, scale=None):
    torch._check(q.shape[1] % k.shape[1] == 0, lambda: "query heads must be a multiple of kv heads")
    return q.new_empty(*q.shape[:-1], v.shape[-1])


ATTENTION = torch.ops.dynasparse.attention.default
