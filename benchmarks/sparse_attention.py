"""Sparse attention against dense, side by side in one run: the kernel, a Llama prefill, and perplexity.

1. attention only (8 heads, head dim 64, causal, batch 1): causal SDPA vs plan + block-sparse attention at
   keep ratios 1.0 / 0.5 / 0.25 / 0.1 (sinks and diagonal included), with the estimator's share of the
   sparse time and the output error vs dense;
2. prefill of a Llama built from config at 8k tokens: the model vs ``dynasparse.optimize`` with sparse
   attention; the same for the real SmolLM2-135M on 8k tokens of help text, with perplexity per estimator;
3. quality: held-out perplexity of the project's byte-level LM (``dynasparse.harness.bytelm``, trained on stdlib
   text) at 1k-4k context, dense vs sparse settings.

    python benchmarks/sparse_attention.py [--quick] [--parts attention prefill smollm2 quality] [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import benchmarks  # noqa: F401
except ImportError:  # run as a file: put the repo root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dynasparse
from dynasparse.harness import bytelm
from dynasparse.harness.bench import Case, compare, write_results
from dynasparse.ir.ops import block_plan, block_sparse_attention
from dynasparse.kernels.estimators import ESTIMATORS
from dynasparse.kernels.sparse_attention import block_layout

KEEP_RATIOS = (1.0, 0.5, 0.25, 0.1)
BLOCK = 64
# SmolLM2 rows: (estimator, selector). keep_ratio: a fixed share of each row's blocks; mass: the fewest blocks
# whose estimated attention mass reaches the share (FlexPrefill), so each head and row takes what it needs
SMOLLM2_SETTINGS = {  # row name after "dynasparse " -> SparseAttentionConfig fields
    "pooled keep 0.1": dict(estimator="pooled", keep_ratio=0.1),
    "vertical_slash keep 0.25": dict(estimator="vertical_slash", keep_ratio=0.25),
    "vertical_slash keep 0.1": dict(estimator="vertical_slash", keep_ratio=0.1),
    "antidiagonal keep 0.25": dict(estimator="antidiagonal", keep_ratio=0.25),
    "antidiagonal keep 0.1": dict(estimator="antidiagonal", keep_ratio=0.1),
    "antidiagonal mass 0.9": dict(estimator="antidiagonal", mass=0.9),
    "antidiagonal mass 0.95": dict(estimator="antidiagonal", mass=0.95),
    "token sparse, 75% of the tokens per KV head": dict(token_keep=0.75),
    "token sparse, 50% of the tokens per KV head": dict(token_keep=0.5),
}


def _median_time(fn, repeats: int = 3) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)
    fn()
    samples = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def attention_part(lengths: list[int], repeats: int, device: str = "cpu", heads: int = 8, head_dim: int = 64) -> str:
    """On CPU in fp32 against SDPA's flash kernel; on CUDA in bf16 against SDPA (FlashAttention there)."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    markdown = ""
    for length in lengths:
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, heads, length, head_dim, device=device, dtype=dtype) for _ in range(3))
        with torch.inference_mode():
            dense = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        cases = []
        for ratio in KEEP_RATIOS:
            def plan(ratio=ratio):
                return block_plan(q, k, None, True, None, BLOCK, "pooled", "keep_ratio", ratio, 1, 1, 0, BLOCK)

            def run(plan=plan):
                counts, indices = plan()
                return block_sparse_attention(q, k, v, None, counts, indices, True, None, BLOCK, 0)

            with torch.inference_mode():
                counts, _ = plan()
                error = (run().transpose(1, 2) - dense).abs().max().item()
                share = _median_time(plan) / _median_time(run)
            valid = block_layout(length, length, BLOCK, True, 1, 1, q.device)[0].sum().item() * heads
            cases.append(Case(f"sparse keep {ratio:g}", run,
                              {"blocks kept": counts.sum().item() / valid, "estimator share": share,
                               "max abs err": error}))
        rows = compare(Case("SDPA causal (dense)", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
                       cases, warmup=1, repeats=repeats)
        meta = {"heads": heads, "head_dim": head_dim, "block": BLOCK, "estimator": "pooled",
                "selector": "keep_ratio (sinks + diagonal included)", "inputs": "random normal q/k/v",
                "dtype": str(dtype), "repeats": repeats}
        suffix = "" if device == "cpu" else f"_{device}"
        markdown += write_results(f"Sparse attention kernel vs causal SDPA, {length} tokens ({device.upper()})", rows,
                                  name=f"sparse_attention_kernel_{length}{suffix}", meta=meta) + "\n"
    return markdown


def prefill_part(length: int, repeats: int) -> str:
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=length,
                         rope_theta=500000.0)
    model = LlamaModel(config).eval()
    ids = bytelm.heldout_tokens(length)[None]
    cases = []
    with torch.inference_mode():
        reference = model(input_ids=ids).last_hidden_state
    for ratio in (0.25, 0.1):
        cfg = dynasparse.SparseAttentionConfig(keep_ratio=ratio, block_size=BLOCK)
        optimized = dynasparse.optimize(model, [cfg], example_kwargs={"input_ids": ids})
        with torch.inference_mode():
            hidden = optimized(input_ids=ids).last_hidden_state
        cosine = F.cosine_similarity(hidden, reference, dim=-1).mean().item()
        cases.append(Case(f"dynasparse keep {ratio:g}", lambda m=optimized: m(input_ids=ids),
                          {"mean token cosine": cosine}))
    rows = compare(Case("Llama (HF, SDPA)", lambda: model(input_ids=ids)), cases, warmup=1, repeats=repeats)
    meta = {"model": "LlamaModel from config: 4 layers, hidden 512, 8 q / 2 kv heads (random weights)",
            "tokens": length, "batch": 1, "block": BLOCK, "repeats": repeats}
    return write_results(f"Llama prefill, {length} tokens (CPU)", rows, name=f"sparse_attention_prefill_{length}",
                         meta=meta)


def _perplexity(lm_head: torch.nn.Module, hidden: torch.Tensor, ids: torch.Tensor, chunk: int = 1024) -> float:
    """Perplexity of ``ids`` [1, L] from the base model's hidden states, the LM head applied a chunk at a
    time (8k x 49k fp32 logits at once would take 1.6 GB)."""
    total = 0.0
    for start in range(0, ids.shape[1] - 1, chunk):
        stop = min(start + chunk, ids.shape[1] - 1)
        logits = lm_head(hidden[0, start:stop]).float()
        total += F.cross_entropy(logits, ids[0, start + 1:stop + 1], reduction="sum").item()
    return math.exp(total / (ids.shape[1] - 1))


def smollm2_prefill_part(length: int, repeats: int, only: list[str] | None = None) -> str:
    """SmolLM2's prefill (the base model, no cache) at ``length`` tokens of help text: Hugging Face SDPA vs
    sparse attention per estimator and keep ratio, with the perplexity of the same tokens. ``only``: those
    rows of ``SMOLLM2_SETTINGS`` (their table is written beside the full one)."""
    from dynasparse.harness import zoo

    entry = zoo.load("smollm2")
    base, lm_head = entry.model.model, entry.model.lm_head
    ids = entry.tokenizer(" ".join(zoo.paragraphs()), return_tensors="pt").input_ids[:, :length]

    def forward(model) -> None:  # the timed call; its output is not a metric
        model(input_ids=ids)

    with torch.inference_mode():
        dense_ppl = _perplexity(lm_head, base(input_ids=ids).last_hidden_state, ids)
    cases = []
    for label, fields in SMOLLM2_SETTINGS.items():
        if only and label not in only:
            continue
        cfg = dynasparse.SparseAttentionConfig(block_size=BLOCK, **fields)
        optimized = dynasparse.optimize(base, [cfg], example_kwargs={"input_ids": ids})
        with torch.inference_mode():
            ppl = _perplexity(lm_head, optimized(input_ids=ids).last_hidden_state, ids)
        cases.append(Case(f"dynasparse {label}", lambda m=optimized: forward(m),
                          {"perplexity": ppl, "ppl change %": 100 * (ppl / dense_ppl - 1)}))
    with torch.inference_mode():  # one forward per repeat is ~30 s on 2 cores: no warmup, no memory pass
        rows = compare(Case("SmolLM2 (HF, SDPA)", lambda: forward(base), {"perplexity": dense_ppl}), cases,
                       warmup=0, repeats=repeats, measure_memory=False)
    meta = {"model": "SmolLM2-135M-Instruct (30 layers, 9 q / 3 kv heads), fp32, base model without LM head",
            "tokens": length, "text": "help topics", "batch": 1, "block": BLOCK, "repeats": repeats}
    return write_results(f"SmolLM2 prefill, {length} tokens (CPU)", rows,
                         name=f"sparse_attention_smollm2_prefill_{length}{'_subset' if only else ''}", meta=meta)


def quality_part(contexts: list[int], tokens: int) -> str:
    model = bytelm.load_or_train("small")
    held_out = bytelm.heldout_tokens(tokens)
    default = dynasparse.SparseAttentionConfig.estimator  # the estimator of the rows that name none
    settings = {"keep 0.5": dict(keep_ratio=0.5), "keep 0.25": dict(keep_ratio=0.25),
                "keep 0.1": dict(keep_ratio=0.1), "mass 0.9": dict(mass=0.9),
                **{f"{name} keep 0.25": dict(keep_ratio=0.25, estimator=name) for name in ESTIMATORS if name != default}}
    example = {"input_ids": held_out[None, :contexts[0]]}
    optimized = {name: dynasparse.optimize(model, [dynasparse.SparseAttentionConfig(
        block_size=BLOCK, min_seq_len=0, **kwargs)], example_kwargs=example) for name, kwargs in settings.items()}
    header = "| setting | " + " | ".join(f"ppl @ {c}" for c in contexts) + " |"
    lines = [header, "|---|" + "---:|" * len(contexts)]
    results = {}
    with torch.inference_mode():
        for name, forward in [("dense", None), *((n, (lambda ids, m=m: m(input_ids=ids).logits))
                                                 for n, m in optimized.items())]:
            row = [bytelm.perplexity(model, held_out, c, forward=forward)["ppl"] for c in contexts]
            results[name] = row
            lines.append(f"| {name} | " + " | ".join(f"{p:.3f}" for p in row) + " |")
            print(lines[-1], flush=True)
    title = f"Byte-level LM perplexity, dense vs sparse attention ({tokens} held-out bytes, block {BLOCK})"
    markdown = f"# {title}\n\n" + "\n".join(lines) + "\n"
    out = Path("benchmarks") / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "sparse_attention_quality.md").write_text(markdown)
    (out / "sparse_attention_quality.json").write_text(json.dumps({"contexts": contexts, "ppl": results}, indent=2))
    return markdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["attention", "prefill", "smollm2", "quality"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--prefill-length", type=int, default=8192)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="device of the attention part (cuda: Triton vs FlashAttention)")
    parser.add_argument("--smollm2-rows", nargs="+", choices=list(SMOLLM2_SETTINGS), default=None,
                        help="only these SmolLM2 rows (beside the dense model)")
    parser.add_argument("--quick", action="store_true", help="smoke run: short lengths, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.prefill_length, args.contexts, args.tokens, args.repeats = [512], 512, [256], 1024, 1
    if "attention" in args.parts:
        print(attention_part(args.lengths, args.repeats, args.device), flush=True)
    if "prefill" in args.parts:
        print(prefill_part(args.prefill_length, args.repeats), flush=True)
    if "smollm2" in args.parts:
        print(smollm2_prefill_part(args.prefill_length, min(args.repeats, 2), args.smollm2_rows), flush=True)
    if "quality" in args.parts:
        print(quality_part(args.contexts, args.tokens), flush=True)


if __name__ == "__main__":
    main()
