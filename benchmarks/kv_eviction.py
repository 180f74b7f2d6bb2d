"""KV eviction against the full cache, side by side in one run: decode speed, perplexity, retrieval.

1. decode: a Llama built from config, batch 8, caches holding 2k / 8k tokens, timed decode steps: Hugging
   Face's own cache (DynamicCache), dynasparse's full cache, and bounded caches of 1k tokens per policy; ms
   per step, speedup vs the full cache, tokens/s, cache bytes;
2. quality: held-out perplexity of the project's byte-level LM (``dynasparse.harness.bytelm``) read through the
   bounded cache in chunks, per policy at budgets of 10 / 20 / 50 % of the context;
3. retrieval: a key stated at the start of a long code context, asked for at the end: greedy exact match,
   and the share of the key's bytes the bounded cache still holds when the question has been read.

    python benchmarks/kv_eviction.py [--quick] [--parts decode quality retrieval]
"""
from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers as hf

try:
    import benchmarks  # noqa: F401
except ImportError:  # run as a file: put the repo root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dynasparse
from dynasparse.harness import bytelm
from dynasparse.runtime.steps import TorchSteps, decoder_for, prefill
from dynasparse.table import table

POLICIES = ("streaming", "h2o", "tova", "snapkv")
OUT = Path("benchmarks") / "results"


def _save(name: str, markdown: str, data: dict) -> str:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.md").write_text(markdown)
    (OUT / f"{name}.json").write_text(json.dumps(data, indent=2))
    return markdown


def _decode_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = hf.LlamaConfig(vocab_size=256, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                            num_key_value_heads=8, intermediate_size=1376, max_position_embeddings=32768)
    return hf.LlamaForCausalLM(config).eval()


def _hf_decode_ms(model, batch: int, context: int, steps: int) -> tuple[float, int]:
    """Hugging Face's own cache, filled with ``context`` random tokens (decode speed depends on shapes only)."""
    config = model.config
    cache = hf.DynamicCache(config=config)
    head_dim = config.hidden_size // config.num_attention_heads
    for layer in range(config.num_hidden_layers):
        cache.update(torch.randn(batch, config.num_key_value_heads, context, head_dim),
                     torch.randn(batch, config.num_key_value_heads, context, head_dim), layer)
    token = torch.zeros(batch, 1, dtype=torch.long)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        times.append(time.perf_counter() - start)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    nbytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    return statistics.median(times) * 1e3, nbytes


def _our_decode_ms(model, batch: int, context: int, steps: int, kv: dynasparse.KVEvictionConfig
                   ) -> tuple[float, int]:
    """dynasparse's cache, its slots filled with the last ``context`` (or ``capacity``) random tokens."""
    step = TorchSteps(decoder_for(model, kv), batch, context + steps + 1, torch.device("cpu"))
    for state in step.cache.states:
        held = min(state["keys"].shape[2] - 1, context)
        state["keys"][:, :, :held].normal_()
        state["values"][:, :, :held].normal_()
        state["positions"][:, :, :held] = torch.arange(context - held, context)
        state["scores"][:, :, :held].uniform_()
        state["seen"].fill_(context)
    token = torch.zeros(batch, 1, dtype=torch.long)
    position = torch.full((batch, 1), context)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        logits = step(token, torch.ones_like(token), position)[:, -1]
        times.append(time.perf_counter() - start)
        token, position = logits.argmax(-1, keepdim=True), position + 1
    return statistics.median(times) * 1e3, step.allocated_bytes


def decode_part(contexts: list[int], budget: int, steps: int, batch: int) -> str:
    model = _decode_model()
    rows, data = [], []
    with torch.inference_mode():
        for context in contexts:
            hf_ms, hf_bytes = _hf_decode_ms(model, batch, context, steps)
            full_ms, full_bytes = _our_decode_ms(model, batch, context, steps,
                                                 dynasparse.KVEvictionConfig(policy="full"))
            cases = [("HF DynamicCache", hf_ms, hf_bytes), ("dynasparse full", full_ms, full_bytes)]
            for policy in POLICIES:
                ms, nbytes = _our_decode_ms(model, batch, context, steps, dynasparse.KVEvictionConfig(
                    policy=policy, budget=budget, sink=4, recent=64))
                cases.append((f"{policy} {budget}", ms, nbytes))
            for name, ms, nbytes in cases:
                rows.append([context, name, f"{ms:.2f}", f"{full_ms / ms:.2f}x", f"{batch * 1e3 / ms:.0f}",
                             f"{nbytes / 2**20:.1f}"])
                data.append({"context": context, "case": name, "ms_per_step": ms, "speedup_vs_full": full_ms / ms,
                             "tokens_per_s": batch * 1e3 / ms, "cache_bytes": nbytes})
                print(rows[-1], flush=True)
    title = (f"Decode step, Llama from config (4 layers, hidden 512, 8 KV heads), batch {batch}, CPU, budget "
             f"{budget} tokens, caches filled to the context, median of {steps} steps")
    header = ["context", "cache", "ms / step", "speedup vs full", "tokens / s", "cache MiB"]
    markdown = f"# {title}\n\n" + table(header, rows, markdown=True)
    return _save("kv_eviction_decode", markdown, {"title": title, "rows": data})


def _bounded_ppl(model, tokens: torch.Tensor, context: int, kv: dynasparse.KVEvictionConfig) -> float:
    """Perplexity of windows of ``context`` tokens read in chunks through the bounded cache (each chunk sees
    the cache plus itself), the first token of each window unscored."""
    decoder = decoder_for(model, kv)
    windows = tokens[: len(tokens) // context * context].reshape(-1, context)
    nll, count = 0.0, 0
    for window in windows:
        ids = window[None]
        step = TorchSteps(decoder, 1, context, ids.device)
        chunks = []
        prefill(step, ids, torch.ones_like(ids), kv.chunk_size, on_logits=lambda start, logits: chunks.append(logits))
        logits = torch.cat(chunks, dim=1)
        loss = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum")
        nll, count = nll + loss.item(), count + context - 1
    return math.exp(nll / count)


def quality_part(context: int, tokens: int, budgets: list[float], chunk: int) -> str:
    model = bytelm.load_or_train("small")
    held_out = bytelm.heldout_tokens(tokens)
    rows, data = [], {}
    with torch.inference_mode():
        full = _bounded_ppl(model, held_out, context, dynasparse.KVEvictionConfig(policy="full", chunk_size=chunk))
        rows.append(["full cache", f"{full:.3f}"] + ["-"] * len(budgets))
        data["full"] = full
        print(rows[-1], flush=True)
        for policy in POLICIES:
            row = [policy, "-"]
            for budget in budgets:
                recent = max(8, int(budget * context) // 4)
                ppl = _bounded_ppl(model, held_out, context, dynasparse.KVEvictionConfig(
                    policy=policy, budget=budget, sink=4, recent=recent, chunk_size=chunk))
                data[f"{policy} {budget:g}"] = ppl
                row.append(f"{ppl:.3f} ({ppl / full - 1:+.1%})")
            rows.append(row)
            print(rows[-1], flush=True)
    title = (f"Byte-level LM perplexity through the bounded cache: {tokens} held-out bytes in windows of {context}, "
             f"chunks of {chunk}, sink 4, recent = budget / 4")
    header = ["policy", "full"] + [f"budget {b:.0%}" for b in budgets]
    markdown = f"# {title}\n\n" + table(header, rows, markdown=True)
    return _save("kv_eviction_quality", markdown, {"title": title, "ppl": data})


def _retrieval_prompts(count: int, filler: int) -> list[tuple[str, str]]:
    text = bytelm.corpus("heldout").decode(errors="replace")
    rng = random.Random(0)
    prompts = []
    for i in range(count):
        key = "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(6))
        start = rng.randrange(0, len(text) - filler)
        body = text[start:start + filler]
        prompts.append((f'SECRET_KEY = "{key}"\n\n{body}\n\nassert SECRET_KEY == "', key))
    return prompts


def retrieval_part(count: int, filler: int, budgets: list[float]) -> str:
    model = bytelm.load_or_train("small")
    prompts = _retrieval_prompts(count, filler)
    ids = [bytelm.encode(p) for p, _ in prompts]
    length = max(len(i) for i in ids)
    batch = torch.zeros(len(ids), length, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for row, tokens in enumerate(ids):
        batch[row, length - len(tokens):], mask[row, length - len(tokens):] = tokens, 1
    settings = [("full cache", dynasparse.KVEvictionConfig(policy="full"))]
    for policy in POLICIES:
        for budget in budgets:
            settings.append((f"{policy} {budget:.0%}", dynasparse.KVEvictionConfig(
                policy=policy, budget=budget, sink=4, recent=max(8, int(budget * length) // 4))))
    rows, data = [], {}
    needle = range(len('SECRET_KEY = "'), len('SECRET_KEY = "') + 6)  # the key's real-token positions
    with torch.inference_mode():
        for name, kv in settings:
            out = dynasparse.generate(model, batch, mask, max_new_tokens=6, kv=kv).sequences[:, length:]
            hits = sum(bytelm.decode(out[row]) == key for row, (_, key) in enumerate(prompts))
            step = TorchSteps(decoder_for(model, kv), len(prompts), length, batch.device)
            prefill(step, batch, mask, kv.chunk_size)
            held = torch.stack([state["positions"] for state in step.cache.states])  # [layers, B, Hkv, S]
            kept = torch.stack([(held == p).any(-1) for p in needle]).float().mean().item()
            rows.append([name, f"{hits}/{count}", f"{kept:.0%}"])
            data[name] = {"recall": hits / count, "key_bytes_in_cache": kept}
            print(rows[-1], flush=True)
    title = (f"Retrieval: a 6-letter key stated before {filler} bytes of held-out code, asked for at the end "
             f"(batch of {count} left-padded prompts). Recall: greedy exact match. Key bytes in cache: share "
             "of (layer, row, KV head, key byte) still cached when the question has been read")
    markdown = f"# {title}\n\n" + table(["cache", "keys recalled", "key bytes in cache"], rows, markdown=True)
    return _save("kv_eviction_retrieval", markdown, {"title": title, "results": data})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["decode", "quality", "retrieval"])
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--ppl-context", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.2, 0.5])
    parser.add_argument("--keys", type=int, default=8)
    parser.add_argument("--filler", type=int, default=1500)
    parser.add_argument("--quick", action="store_true", help="smoke run: short contexts, few tokens")
    args = parser.parse_args()
    if args.quick:
        args.contexts, args.budget, args.steps, args.batch = [512], 128, 4, 2
        args.ppl_context, args.tokens, args.chunk, args.keys, args.filler = 512, 1024, 64, 2, 300
    if "decode" in args.parts:
        print(decode_part(args.contexts, args.budget, args.steps, args.batch), flush=True)
    if "quality" in args.parts:
        print(quality_part(args.ppl_context, args.tokens, args.budgets, args.chunk), flush=True)
    if "retrieval" in args.parts:
        print(retrieval_part(args.keys, args.filler, args.budgets), flush=True)


if __name__ == "__main__":
    main()
