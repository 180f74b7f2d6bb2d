"""A small byte-level causal LM that the project trains itself, to measure what sparsity costs.

Sparse attention and KV-cache eviction can only be judged on a *trained* model at long context:
random-weight models have nothing to lose, and nothing may be downloaded. So we train a small Llama
(real Hugging Face model code) on text that ships with every Python -- the pydoc topics and the
standard library sources -- cache the weights, and report perplexity on held-out stdlib files.
Bytes are the tokens, so there is no tokenizer to ship and bits per token are bits per byte.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import platform
import sysconfig
import time
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

VOCAB = 256
SPLITS = ("train", "heldout")
HELDOUT_PERCENT = 5
MAX_CORPUS_BYTES = 20 << 20
SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "__pycache__"}
CACHE_VERSION = "v1"


@dataclass(frozen=True)
class Spec:
    """Model shape plus the default training recipe for one size."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    steps: int  # optimizer steps in all, the long phase included
    seq_len: int  # main phase
    batch_size: int  # sequences per step in the main phase
    lr: float  # peak; warmup then cosine decay to a tenth
    long_steps: int  # final steps at long_seq_len, with the same number of tokens per step
    long_seq_len: int
    log_every: int
    exit_loss: float = 0.0  # weight of the early-exit loss: every layer's hidden state through the shared head



SIZES: dict[str, Spec] = {
    # 2.8M parameters. Measured on 2 CPU threads, fp32: 4 x 1024 ~0.85 s/step, 2 x 2048 ~1.2 s/step,
    # so 440 + 80 steps (2.1M bytes) take ~8 minutes, inside a 10-minute budget with room for noise.
    "small": Spec(layers=4, hidden=256, heads=8, kv_heads=2, intermediate=688, steps=520, seq_len=1024,
                  batch_size=4, lr=3e-3, long_steps=80, long_seq_len=2048, log_every=20),
    # The same model trained with LayerSkip's early-exit loss, so its first layers draft for self-speculative
    # decoding (each step also runs the head on every layer: ~10% slower).
    "small-exit": Spec(layers=4, hidden=256, heads=8, kv_heads=2, intermediate=688, steps=520, seq_len=1024,
                       batch_size=4, lr=3e-3, long_steps=80, long_seq_len=2048, log_every=20, exit_loss=1.0),
    # For tests: trains in about a second.
    "tiny": Spec(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=176, steps=24, seq_len=64,
                 batch_size=8, lr=1e-2, long_steps=4, long_seq_len=128, log_every=8),
}


@lru_cache(maxsize=None)
def _documents() -> dict[str, tuple[tuple[str, bytes], ...]]:
    """(name, text) per split: pydoc topics train; stdlib files split by a stable hash of their path."""
    from pydoc_data.topics import topics

    docs: dict[str, list[tuple[str, bytes]]] = {
        "train": [(f"pydoc:{key}", topics[key].encode()) for key in sorted(topics)], "heldout": []}
    total = sum(len(data) for _, data in docs["train"])
    root = Path(sysconfig.get_paths()["stdlib"])
    relative = (path.relative_to(root) for path in root.rglob("*.py"))
    for rel in sorted(path.as_posix() for path in relative if not SKIP_DIRS.intersection(path.parts[:-1])):
        data = (root / rel).read_bytes()
        if total + len(data) > MAX_CORPUS_BYTES:
            break
        total += len(data)
        bucket = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:4], "big") % 100
        docs["heldout" if bucket < HELDOUT_PERCENT else "train"].append((rel, data))
    return {split: tuple(items) for split, items in docs.items()}


@lru_cache(maxsize=None)
def corpus(split: str) -> bytes:
    """The ``"train"`` or ``"heldout"`` text, documents joined by blank lines."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return b"\n\n".join(data for _, data in _documents()[split])


def encode(text: str | bytes) -> torch.Tensor:
    """UTF-8 bytes as a 1-D long tensor of ids in [0, 256)."""
    data = text.encode() if isinstance(text, str) else text
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).astype(np.int64))


def decode(ids: torch.Tensor | list[int]) -> str:
    """Ids back to text; invalid UTF-8 becomes U+FFFD."""
    return torch.as_tensor(ids).reshape(-1).to(torch.uint8).numpy().tobytes().decode(errors="replace")


def heldout_tokens(n: int) -> torch.Tensor:
    """The first ``n`` held-out bytes as ids."""
    data = corpus("heldout")
    if n > len(data):
        raise ValueError(f"only {len(data)} held-out bytes, asked for {n}")
    return encode(data[:n])


def build_model(size: str = "small") -> LlamaForCausalLM:
    """A randomly initialised byte-level ``LlamaForCausalLM`` (GQA, RoPE theta 5e5, tied embeddings)."""
    import transformers as hf

    spec = SIZES[size]
    config = hf.LlamaConfig(vocab_size=VOCAB, hidden_size=spec.hidden, num_hidden_layers=spec.layers,
                            num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
                            head_dim=spec.hidden // spec.heads, intermediate_size=spec.intermediate,
                            max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=True,
                            bos_token_id=None, eos_token_id=None, pad_token_id=None,
                            attn_implementation="sdpa")
    return hf.LlamaForCausalLM(config)


def lr_factor(step: int, steps: int) -> float:
    """Linear warmup over the first 5% of steps, then cosine decay to 0.1."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def _loss(model: LlamaForCausalLM, windows: torch.Tensor, exit_loss: float) -> torch.Tensor:
    """Next-byte cross-entropy; with ``exit_loss`` > 0 plus that weight times the mean loss of the earlier
    layers read through the model's own final norm and head (LayerSkip), so early layers predict too."""
    targets = windows[:, 1:].reshape(-1)
    out = model(input_ids=windows[:, :-1], use_cache=False, output_hidden_states=exit_loss > 0)
    loss = F.cross_entropy(out.logits.reshape(-1, VOCAB), targets)
    if exit_loss > 0:
        early = [model.lm_head(model.model.norm(h)) for h in out.hidden_states[1:-1]]
        loss = loss + exit_loss * torch.stack([F.cross_entropy(x.reshape(-1, VOCAB), targets) for x in early]).mean()
    return loss


def train(size: str = "small", steps: int | None = None, seq_len: int | None = None,
          batch_size: int | None = None, lr: float | None = None, long_steps: int | None = None,
          long_seq_len: int | None = None, seed: int = 0,
          log: Callable[[str], object] = print) -> LlamaForCausalLM:
    """Train from scratch on random windows of the train split; ``None`` takes the size's default.

    The last ``long_steps`` steps use ``long_seq_len`` windows (fewer of them, same tokens per step)
    so the model works at 2k-4k context. Returns the model in eval mode.
    """
    overrides = dict(steps=steps, seq_len=seq_len, batch_size=batch_size, lr=lr, long_steps=long_steps,
                     long_seq_len=long_seq_len)
    recipe = replace(SIZES[size], **{key: value for key, value in overrides.items() if value is not None})
    data = encode(corpus("train"))
    if len(data) <= max(recipe.seq_len, recipe.long_seq_len) + 1:
        raise ValueError(f"train split has only {len(data)} bytes")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(size)
    model.train()
    generator = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=recipe.lr, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, recipe.steps))
    tokens_per_step = recipe.batch_size * recipe.seq_len
    log(f"bytelm-{size}: {sum(p.numel() for p in params) / 1e6:.2f}M params, {len(data) / 1e6:.1f}M train "
        f"bytes, {torch.get_num_threads()} threads, recipe {recipe}")
    start = interval_start = time.perf_counter()
    interval_loss, interval_steps, interval_tokens = 0.0, 0, 0
    for step in range(recipe.steps):
        length = recipe.long_seq_len if step >= recipe.steps - recipe.long_steps else recipe.seq_len
        starts = torch.randint(0, len(data) - length, (max(1, tokens_per_step // length),), generator=generator)
        windows = torch.stack([data[s:s + length + 1] for s in starts.tolist()])
        loss = _loss(model, windows, recipe.exit_loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        interval_loss, interval_steps = interval_loss + loss.item(), interval_steps + 1
        interval_tokens += windows[:, 1:].numel()
        if (step + 1) % recipe.log_every == 0 or step + 1 == recipe.steps:
            now = time.perf_counter()
            mean = interval_loss / interval_steps
            log(f"step {step + 1}/{recipe.steps} seq {length} loss {mean:.3f} bits/byte {mean / math.log(2):.3f} "
                f"lr {schedule.get_last_lr()[0]:.2e} tok/s {interval_tokens / (now - interval_start):.0f} "
                f"elapsed {now - start:.0f}s")
            interval_start, interval_loss, interval_steps, interval_tokens = now, 0.0, 0, 0
    return model.eval()


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where models trained here are cached: ``cache_dir``, else $DYNASPARSE_CACHE, else ~/.cache/dynasparse."""
    return Path(cache_dir or os.environ.get("DYNASPARSE_CACHE", "~/.cache/dynasparse")).expanduser()


def cache_path(size: str = "small", cache_dir: str | os.PathLike | None = None) -> Path:
    """Where ``load_or_train`` keeps the weights for ``size``."""
    return cache_root(cache_dir) / f"bytelm-{size}-{CACHE_VERSION}.pt"


def save_cached(path: Path, payload: dict, log: Callable[[str], object] = print) -> None:
    """Write ``payload`` to ``path`` whole or not at all: a run killed while saving leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(payload, partial)
    os.replace(partial, path)
    log(f"saved {path}")


def load_or_train(size: str = "small", cache_dir: str | os.PathLike | None = None, force: bool = False,
                  log: Callable[[str], object] = print) -> LlamaForCausalLM:
    """The cached model for ``size`` in eval mode, trained (and cached) first if missing, stale or forced."""
    path, spec = cache_path(size, cache_dir), SIZES[size]
    if path.exists() and not force:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if {"exit_loss": 0.0, **saved["spec"]} == asdict(spec):  # files older than exit_loss trained without
            model = build_model(size)
            model.load_state_dict(saved["state_dict"])
            return model.eval()
        log(f"{path} was trained with another recipe; retraining")
    model = train(size, log=log)
    save_cached(path, {"spec": asdict(spec), "seed": 0, "python": platform.python_version(),
                       "state_dict": model.state_dict()}, log)
    return model


def perplexity(model: torch.nn.Module, tokens: torch.Tensor, context: int, stride: int | None = None,
               forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
               batch_size: int | None = None) -> dict:
    """Perplexity of ``tokens`` read in windows of ``context`` tokens, ``batch_size`` windows per call.

    Windows start every ``stride`` tokens (default ``context``: non-overlapping, so the first token
    of each window goes unscored); each token is scored once, by the first window that predicts it.
    A trailing partial window is dropped. ``forward(input_ids) -> logits`` replaces the default
    ``model(input_ids=...).logits``, e.g. for an optimized model.
    """
    stride = context if stride is None else stride
    if not 0 < stride <= context:
        raise ValueError(f"stride must be in (0, context={context}], got {stride}")
    tokens = tokens.reshape(-1)
    if len(tokens) < context:
        raise ValueError(f"need at least context={context} tokens, got {len(tokens)}")
    if forward is None:
        def forward(input_ids: torch.Tensor) -> torch.Tensor:
            return model(input_ids=input_ids, use_cache=False).logits
    device = next(model.parameters()).device
    starts = range(0, len(tokens) - context + 1, stride)
    batch_size = batch_size or max(1, 8192 // context)
    total_nll, count = 0.0, 0
    with torch.no_grad():
        for first in range(0, len(starts), batch_size):
            batch = starts[first:first + batch_size]
            input_ids = torch.stack([tokens[s:s + context] for s in batch]).to(device)
            logits = forward(input_ids)
            nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none")
            for row, start in enumerate(batch):
                scored = nll[row] if start == 0 else nll[row, -min(stride, context - 1):]
                total_nll += scored.sum().item()
                count += scored.numel()
    mean = total_nll / count
    return {"ppl": math.exp(mean), "bits_per_byte": mean / math.log(2), "tokens": count}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dynasparse.harness.bytelm",
                                     description="Train (or load) the byte LM and print held-out perplexity.")
    parser.add_argument("--size", default="small", choices=sorted(SIZES))
    parser.add_argument("--force", action="store_true", help="retrain even if cached weights exist")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--tokens", type=int, default=65536, help="held-out bytes to evaluate")
    args = parser.parse_args(argv)
    model = load_or_train(args.size, cache_dir=args.cache_dir, force=args.force)
    tokens = heldout_tokens(args.tokens)
    print(f"{'context':>8} {'ppl':>8} {'bits/byte':>10} {'tokens':>8}")
    for context in (512, 1024, 2048, 4096):
        result = perplexity(model, tokens, context)
        print(f"{context:>8} {result['ppl']:>8.3f} {result['bits_per_byte']:>10.3f} {result['tokens']:>8}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
