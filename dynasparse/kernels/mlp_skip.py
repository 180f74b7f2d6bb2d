"""Per-token MLP skipping: which tokens run a block's MLP, and running it on those only.

``route``: a token runs the MLP where its router logit ``x @ weight + bias`` (in fp32) is positive; the
bias starts high, so an untrained router keeps every token and the block is the model's own.
``routed``: the MLP's output for kept tokens, the adapter's (a low-rank map of the same input, FlexiDepth's
cheap stand-in) for the others. Eagerly the MLP runs on the kept tokens only (gathered, as token merging
gathers, and scattered back); traced (compile, export) every token runs it and a select keeps the right
value, the same numbers with static shapes.
"""
from __future__ import annotations

from typing import Callable

import torch

KEEP_ALL = 2.0  # an untrained router's bias: every token runs the MLP, and training moves it in a few dozen steps


def router_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """fp32 [...]: one logit per token of ``x`` [..., D]; fit trains through its sigmoid."""
    return x.float() @ weight.float() + bias.float()


def route_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Boolean [...]: the tokens of ``x`` [..., D] whose router logit is positive."""
    return router_logits(x, weight, bias) > 0


def adapter(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return (x @ down.to(x.dtype)) @ up.to(x.dtype)


def _traced(x: torch.Tensor) -> bool:
    return (torch.compiler.is_compiling() or torch.compiler.is_exporting()
            or isinstance(x, torch._subclasses.FakeTensor))


def routed(mlp: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, keep: torch.Tensor,
           down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``mlp(x)`` where ``keep``, ``adapter(x)`` elsewhere; eagerly ``mlp`` only reads the kept tokens."""
    if _traced(x):
        return torch.where(keep[..., None], mlp(x), adapter(x, down, up))
    flat = x.reshape(-1, x.shape[-1])
    out = adapter(flat, down, up)
    index = keep.reshape(-1).nonzero()[:, 0]
    if index.numel():
        out.index_copy_(0, index, mlp(flat.index_select(0, index)[None])[0].to(out.dtype))
    return out.view(*x.shape[:-1], out.shape[-1])
