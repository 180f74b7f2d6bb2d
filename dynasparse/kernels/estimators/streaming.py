"""Streaming: no content, only distance from the diagonal (StreamingLLM's A-shape)."""
from __future__ import annotations

import torch

from dynasparse.kernels.blocks import last_query_positions, num_blocks
from dynasparse.kernels.estimators.base import EstimatorInputs


def streaming_scores(x: EstimatorInputs) -> torch.Tensor:
    """[NQ, NK]: the nearer a block to the row's diagonal, the higher. With the forced sinks this is
    StreamingLLM's A-shape, its window as wide as the selector's amount: most heads attend to the first
    tokens and their recent past, so this costs nothing to estimate and needs no look at the content."""
    q_len, kv_len, device = x.q.shape[2], x.k.shape[2], x.q.device
    diagonal = last_query_positions(q_len, kv_len, x.block_size, device) // x.block_size
    return -(diagonal[:, None] - torch.arange(num_blocks(kv_len, x.block_size), device=device)).abs().float()
