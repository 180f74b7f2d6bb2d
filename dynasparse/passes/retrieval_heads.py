"""Retrieval heads: the few KV heads of a decoder that copy facts from far back in the context.

DuoAttention and RazorAttention find that only a minority of heads read the whole context; the rest attend
to the first tokens and a recent window. A cache can then keep the whole context (or a large share) for the
retrieval heads only. This module scores every KV head once per model: facts are planted in offline text,
the model is asked for one and reads its own correct answer, and a head scores the attention its queries
at the answer's positions pay to the fact's tokens in the context. The calibration text is the standard
library's module docstrings, never the benchmarks' help topics or held-out sources.
"""
from __future__ import annotations

import dataclasses
import json
import random
import sys
from pathlib import Path

import torch

from dynasparse.errors import DynasparseError

NAMES = ("Heron", "Juniper", "Quartz", "Tamarind", "Vesper", "Wren", "Lichen", "Marlow", "Oriel", "Pike")
MIN_TOKENS = 256  # shorter contexts have no "far back" to retrieve from


@dataclasses.dataclass
class HeadScores:
    """Per layer, per KV head: how much attention the head pays to a planted fact when the model states it."""

    model: str
    scores: list[list[float]]  # [layer][kv head]
    samples: int
    context_tokens: int

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dataclasses.asdict(self), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> HeadScores:
        path = Path(path)
        if not path.is_file():
            raise DynasparseError(f"no head scores at {path}: compute them with "
                                  "dynasparse.calibrate_retrieval_heads(model, tokenizer).save(path)")
        data = json.loads(path.read_text())
        fields = {f.name for f in dataclasses.fields(cls)}
        if set(data) != fields:
            raise DynasparseError(f"{path} is not a head-scores file: expected the fields {sorted(fields)}, "
                                  f"got {sorted(data)}")
        return cls(**data)

    def retrieval(self, share: float) -> set[tuple[int, int]]:
        """(layer, KV head) of the top ``share`` of heads by score (at least one)."""
        ranked = sorted(((s, layer, head) for layer, row in enumerate(self.scores) for head, s in enumerate(row)),
                        reverse=True)
        count = max(1, round(share * len(ranked)))
        return {(layer, head) for _, layer, head in ranked[:count]}


def calibration_paragraphs() -> list[str]:
    """Prose the model was not asked about anywhere else: the docstrings of the standard library's modules."""
    import importlib
    import pkgutil

    paragraphs = []
    for info in sorted(pkgutil.iter_modules(), key=lambda m: m.name):
        if info.name.startswith("_") or info.name in ("antigravity", "this", "idlelib", "pydoc_data", "inspect",
                                                      "tkinter", "turtle", "turtledemo"):
            continue
        if getattr(info.module_finder, "path", "").find("site-packages") >= 0:
            continue  # the standard library only
        try:
            doc = importlib.import_module(info.name).__doc__ or ""
        except Exception:  # a module that cannot import here (platform-specific) has nothing to give
            continue
        paragraphs += [p.strip() for p in doc.split("\n\n") if len(p.strip()) > 200]
    return paragraphs


def planted_text(tokenizer, paragraphs: list[str], tokens: int, fact: str, depth: float) -> str:
    """The first ``paragraphs`` that fit in about ``tokens`` tokens with ``fact`` planted at ``depth`` (0 =
    first, 1 = last): a needle-in-a-haystack context."""
    chosen, count = [], 0
    for paragraph in paragraphs:
        count += len(tokenizer(paragraph).input_ids)
        if count > tokens:
            break
        chosen.append(paragraph)
    chosen.insert(round(len(chosen) * depth), fact)
    return "\n\n".join(chosen)


def _token_span(offsets: list[tuple[int, int]], start: int, stop: int) -> list[int]:
    """Indices of the tokens overlapping characters [start, stop)."""
    return [i for i, (a, b) in enumerate(offsets) if a < stop and b > start and b > a]


@torch.no_grad()
def calibrate_retrieval_heads(model: torch.nn.Module, tokenizer, samples: int = 8, context_tokens: int = 1024,
                              paragraphs: list[str] | None = None, seed: int = 0) -> HeadScores:
    """Score every KV head of a Hugging Face decoder for retrieval (see the module docstring).

    ``paragraphs``: the calibration text (default: ``calibration_paragraphs()``); it must hold at least
    ``context_tokens`` tokens, and ``context_tokens`` at least ``MIN_TOKENS``."""
    if tokenizer is None:
        raise DynasparseError("calibrating retrieval heads needs the model's tokenizer (to plant facts in text)")
    if context_tokens < MIN_TOKENS:
        raise DynasparseError(f"context_tokens={context_tokens} is too short to find retrieval heads: give at "
                              f"least {MIN_TOKENS} tokens of context")
    paragraphs = calibration_paragraphs() if paragraphs is None else paragraphs
    available = sum(len(tokenizer(p).input_ids) for p in paragraphs)
    if available < context_tokens:
        raise DynasparseError(f"the calibration text has {available} tokens, fewer than context_tokens="
                              f"{context_tokens}: give more paragraphs or a shorter context")
    config = model.config
    layers, kv_heads = config.num_hidden_layers, getattr(config, "num_key_value_heads", config.num_attention_heads)
    groups = config.num_attention_heads // kv_heads
    rng = random.Random(seed)
    total = torch.zeros(layers, kv_heads, dtype=torch.float64)
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")  # the one implementation that returns attention weights
    try:
        for i in range(samples):
            name, code = NAMES[i % len(NAMES)], str(rng.randrange(10000, 100000))
            fact = f"The passcode of the {name} vault is {code}."
            question = f"What is the passcode of the {name} vault?"
            text = planted_text(tokenizer, rng.sample(paragraphs, len(paragraphs)), context_tokens, fact,
                                i / max(samples - 1, 1))
            chat = tokenizer.apply_chat_template([{"role": "user", "content": f"{text}\n\n{question}"},
                                                  {"role": "assistant", "content": fact}], tokenize=False)
            encoded = tokenizer(chat, add_special_tokens=False, return_offsets_mapping=True)
            offsets = encoded["offset_mapping"]
            in_context = chat.index(fact) + fact.index(code)
            in_answer = chat.rindex(code)
            keys = _token_span(offsets, in_context, in_context + len(code))
            answer = _token_span(offsets, in_answer, in_answer + len(code))
            queries = [t - 1 for t in answer]  # the positions that predict the answer's digits
            ids = torch.tensor([encoded["input_ids"]], device=next(model.parameters()).device)
            first = queries[0]
            out = model(input_ids=ids[:, :first], use_cache=True)
            out = model(input_ids=ids[:, first:queries[-1] + 1], past_key_values=out.past_key_values,
                        output_attentions=True)
            for layer, attention in enumerate(out.attentions):  # [1, Hq, T, S]
                mass = attention[0, :, :, keys].float().sum(-1).mean(-1)  # [Hq]
                total[layer] += mass.view(kv_heads, groups).mean(-1).double().cpu()
    finally:
        model.set_attn_implementation(before)
    return HeadScores(str(getattr(config, "name_or_path", "")), (total / samples).tolist(), samples, context_tokens)


def cached_head_scores(model: torch.nn.Module, tokenizer, folder: Path) -> Path:
    """Where a model's head scores live (``folder``/retrieval_heads.json), computed on first use."""
    path = Path(folder) / "retrieval_heads.json"
    if not path.exists():
        print(f"dynasparse: scoring retrieval heads once (planted facts in stdlib docstrings); caching in {path}",
              file=sys.stderr)
        calibrate_retrieval_heads(model, tokenizer).save(path)
    return path
