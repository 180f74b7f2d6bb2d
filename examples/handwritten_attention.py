"""A plain PyTorch transformer whose attention is written by hand (no SDPA), as many user models are.

dynasparse finds its attention by the matmul → scale → mask → softmax → matmul pattern:

    python -m dynasparse inspect examples.handwritten_attention:TinyTransformer
"""
from __future__ import annotations

import math

import torch
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        probs = (scores + mask).softmax(dim=-1)
        return self.out((probs @ v).transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    """Token ids and a padding mask in, hidden states out."""

    def __init__(self, vocab: int = 512, dim: int = 64, heads: int = 4, depth: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    def example_inputs(self, batch: int, seq_len: int) -> dict[str, torch.Tensor]:
        attention_mask = torch.ones(batch, seq_len, dtype=torch.long)
        attention_mask[-1, : seq_len // 4] = 0
        return {"input_ids": torch.randint(0, 512, (batch, seq_len)), "attention_mask": attention_mask}


if __name__ == "__main__":
    import dynasparse

    model = TinyTransformer().eval()
    inputs = model.example_inputs(2, 16)
    optimized = dynasparse.optimize(model, [], example_kwargs=inputs)
    print(optimized.report)
    print("max |Δ|:", (model(**inputs) - optimized(**inputs)).abs().max().item())
