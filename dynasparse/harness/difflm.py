"""A small byte-level masked-diffusion LM that the project trains itself, to measure dKV-Cache on.

No pretrained diffusion LM ships offline, and a cache of keys and values across denoising steps can only be
judged on a trained model: on random weights every step's predictions are noise. So we train a small
bidirectional transformer (Hugging Face's Llama code without the causal mask, as LLaDA) with a masked-diffusion
loss on the byte LM's offline text (``dynasparse.harness.bytelm``), and cache the weights. Byte 256 is the
mask.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from dynasparse.harness.bytelm import cache_root, corpus, encode, lr_factor, save_cached

MASK = 256
VOCAB = 257
CACHE_VERSION = "v1"
MIN_MASK_RATE = 0.02  # t ~ U(MIN_MASK_RATE, 1): each row masks at least a few tokens


@dataclass(frozen=True)
class Spec:
    """Model shape plus its training recipe."""

    layers: int
    hidden: int
    heads: int
    intermediate: int
    steps: int
    seq_len: int
    batch_size: int
    lr: float
    log_every: int


SIZES: dict[str, Spec] = {
    # 1.9M parameters; 0.5-1.4 s per step of 8 x 256 bytes on 1 thread beside other runs (27 minutes in all).
    "small": Spec(layers=4, hidden=192, heads=4, intermediate=512, steps=1200, seq_len=256, batch_size=8,
                  lr=3e-3, log_every=50),
    # The same shape trained on 6x the bytes (3,600 steps of 16 x 256): about 25 minutes on 2 threads alone
    # (0.4 s per step), for the dKV benchmark's quality columns.
    "small-long": Spec(layers=4, hidden=192, heads=4, intermediate=512, steps=3600, seq_len=256, batch_size=16,
                       lr=3e-3, log_every=200),
    # For tests: trains in about a second.
    "tiny": Spec(layers=2, hidden=64, heads=4, intermediate=128, steps=20, seq_len=64, batch_size=8, lr=3e-3,
                 log_every=10),
}


class BidirectionalLM(torch.nn.Module):
    """A Llama that reads its sequence both ways, as LLaDA is: Hugging Face's model handed a full [B, 1, L, L]
    mask (padding only), which it uses as given instead of its causal one. Called like a masked LM, with
    ``input_ids`` and a [B, L] ``attention_mask``."""

    def __init__(self, config):
        super().__init__()
        import transformers as hf

        self.model = hf.LlamaForCausalLM(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        keys = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        full = keys[:, None, None, :].expand(-1, 1, input_ids.shape[1], -1)
        return self.model(input_ids=input_ids, attention_mask=full, use_cache=False)


def build_model(size: str = "small") -> BidirectionalLM:
    """A randomly initialised bidirectional Llama over bytes and the mask (GQA, RoPE, tied embeddings)."""
    import transformers as hf

    spec = SIZES[size]
    config = hf.LlamaConfig(vocab_size=VOCAB, hidden_size=spec.hidden, num_hidden_layers=spec.layers,
                            num_attention_heads=spec.heads, num_key_value_heads=max(1, spec.heads // 2),
                            head_dim=spec.hidden // spec.heads, intermediate_size=spec.intermediate,
                            max_position_embeddings=4 * spec.seq_len, rope_theta=10000.0, tie_word_embeddings=True,
                            bos_token_id=None, eos_token_id=None, pad_token_id=None, attn_implementation="sdpa")
    return BidirectionalLM(config)


def diffusion_loss(model: torch.nn.Module, windows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each row masks every token with its own probability t ~ U(0, 1); the loss is the mean cross-entropy
    of the masked tokens (MaskGIT's form: MDLM weights each by 1/t, an unbiased bound whose variance at
    batches this small kept the model at the unigram loss)."""
    rate = torch.rand(windows.shape[0], 1, generator=generator) * (1 - MIN_MASK_RATE) + MIN_MASK_RATE
    masked = torch.rand(windows.shape, generator=generator) < rate
    logits = model(input_ids=windows.masked_fill(masked, MASK)).logits
    loss = F.cross_entropy(logits.transpose(1, 2), windows, reduction="none")
    return (loss * masked).sum() / masked.sum().clamp(min=1)


def train(size: str = "small", seed: int = 0, log: Callable[[str], object] = print) -> BidirectionalLM:
    """Train from scratch on random windows of the byte LM's train split. Returns the model in eval mode."""
    spec = SIZES[size]
    data = encode(corpus("train"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(size)
    model.train()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.98), weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, spec.steps))
    log(f"difflm-{size}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
        f"{torch.get_num_threads()} threads, {spec}")
    start, interval = time.perf_counter(), []
    for step in range(spec.steps):
        starts = torch.randint(0, len(data) - spec.seq_len, (spec.batch_size,), generator=generator)
        windows = torch.stack([data[s:s + spec.seq_len] for s in starts.tolist()])
        loss = diffusion_loss(model, windows, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        interval.append(loss.item())
        if (step + 1) % spec.log_every == 0 or step + 1 == spec.steps:
            mean = sum(interval) / len(interval)
            log(f"step {step + 1}/{spec.steps} masked-byte loss {mean:.3f} nats ({mean / math.log(2):.3f} bits) "
                f"elapsed {time.perf_counter() - start:.0f}s")
            interval = []
    return model.eval()


def cache_path(size: str = "small", cache_dir: str | os.PathLike | None = None) -> Path:
    return cache_root(cache_dir) / f"difflm-{size}-{CACHE_VERSION}.pt"


def load_or_train(size: str = "small", cache_dir: str | os.PathLike | None = None,
                  log: Callable[[str], object] = print) -> BidirectionalLM:
    """The cached model for ``size`` in eval mode, trained (and cached) first if missing or stale."""
    path, spec = cache_path(size, cache_dir), SIZES[size]
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["spec"] == asdict(spec):
            model = build_model(size)
            model.load_state_dict(saved["state_dict"])
            return model.eval()
        log(f"{path} was trained with another recipe; retraining")
    model = train(size, log=log)
    save_cached(path, {"spec": asdict(spec), "state_dict": model.state_dict()}, log)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dynasparse.harness.difflm",
                                     description="Train (or load) the masked-diffusion byte LM.")
    parser.add_argument("--size", default="small", choices=sorted(SIZES))
    args = parser.parse_args(argv)
    load_or_train(args.size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
