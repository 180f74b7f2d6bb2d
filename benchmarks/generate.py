"""Generation on the real SmolLM2-135M-Instruct: dynasparse against Hugging Face, side by side in one run.

For each (batch, prompt length): prompts are real text (Python's help topics, a different passage per
row, every row the same length), greedy, a fixed number of new tokens. Rows:

* Hugging Face ``generate`` (SDPA, DynamicCache): what a user runs today, the baseline;
* Hugging Face with its StaticCache + ``torch.compile`` (the strongest path it offers, with its own
  Inductor settings; Inductor's weight freezing, which dynasparse's compiled step uses, breaks its static
  cache); compile time is excluded, as for every compiled row;
* dynasparse ``generate`` with the full cache, eager and ``compile=True``;
* each eviction policy at a fixed token budget, eager and compiled.

Columns: end-to-end time and speedup over the baseline (the harness's interleaved medians), prefill ms,
decode tokens/s (per row), KV-cache MiB, and how many generated tokens equal the baseline's greedy tokens
before the first difference (mean over rows).

    python -m benchmarks.generate [--quick] [--batches 1 8] [--prompts 512 2048 8192]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import transformers as hf

try:
    import benchmarks  # noqa: F401
except ImportError:  # run as a file: put the repo root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dynasparse
from dynasparse import KVEvictionConfig
from dynasparse.harness import zoo
from dynasparse.harness.bench import Case, compare, hf_generate_timed, write_results

POLICIES = ("h2o", "tova", "snapkv", "streaming")
MIB = 2**20


def prompts(tokenizer, batch: int, length: int) -> torch.Tensor:
    """[batch, length] token ids: consecutive passages of the help topics, one per row."""
    ids = tokenizer(" ".join(zoo.paragraphs()), return_tensors="pt").input_ids[0]
    if len(ids) < batch * length:
        raise SystemExit(f"the help topics hold {len(ids)} tokens, fewer than {batch} x {length}")
    return ids[:batch * length].reshape(batch, length)


def hf_case(model, ids: torch.Tensor, new_tokens: int, static: bool) -> tuple[callable, list]:
    """A Hugging Face generate job; returns (job, its last output holder)."""
    last: list = [None]
    kwargs = dict(min_new_tokens=new_tokens, pad_token_id=model.config.eos_token_id)
    if static:
        compile_config = hf.CompileConfig(fullgraph=True, mode="default")
        compile_config._compile_all_devices = True  # Hugging Face's own switch for compiling on CPU
        kwargs.update(cache_implementation="static", compile_config=compile_config)

    def job():
        last[0], timings = hf_generate_timed(model, ids, torch.ones_like(ids), new_tokens, **kwargs)
        return timings
    return job, last


def our_case(model, ids: torch.Tensor, new_tokens: int, kv: KVEvictionConfig, compile: bool
             ) -> tuple[callable, list]:
    """(job, last output). Warmup runs the job itself: a compiled step meets each code path of the cache
    step (first chunk, later chunks, eviction, decode) only on a prompt that exercises it."""
    last: list = [None]

    def run(prompt):
        return dynasparse.generate(model, prompt, torch.ones_like(prompt), max_new_tokens=new_tokens, kv=kv,
                                   compile=compile)

    def job():
        out = run(ids)
        last[0] = out.sequences[:, ids.shape[1]:]
        stats = out.stats
        return {"prefill ms": stats.prefill_seconds * 1e3,
                "decode tok/s": (stats.new_tokens - 1) / stats.decode_seconds,
                "cache MiB": stats.cache_allocated_bytes / MIB}
    return job, last


def agreement(tokens: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over rows of the generated tokens equal to the reference's before the first difference."""
    same = (tokens == reference).long().cumprod(-1).sum(-1)
    return float(same.float().mean())


def run_setting(model, tokenizer, batch: int, length: int, new_tokens: int, budget: int, repeats: int,
                compiled: bool, policies: list[str]) -> str:
    ids = prompts(tokenizer, batch, length)
    hf_job, hf_last = hf_case(model, ids, new_tokens, static=False)
    cases, outputs = [], {}
    if compiled:
        job, last = hf_case(model, ids, new_tokens, static=True)
        cases.append(Case("HF StaticCache + compile", job))
        outputs[cases[-1].name] = last
    settings = [("dynasparse full", KVEvictionConfig(policy="full"))]
    settings += [(f"dynasparse {p} {budget}", KVEvictionConfig(policy=p, budget=budget, recent=64)) for p in policies]
    for name, kv in settings:
        for compile in (False, True) if compiled else (False,):
            job, last = our_case(model, ids, new_tokens, kv, compile)
            cases.append(Case(name + (" + compile" if compile else ""), job))
            outputs[cases[-1].name] = last
    rows = compare(Case("HF generate (SDPA, DynamicCache)", hf_job), cases, warmup=1, repeats=repeats,
                   measure_memory=False)
    for row in rows[1:]:
        row.quality[f"tokens = HF (of {new_tokens})"] = agreement(outputs[row.name][0], hf_last[0])
    title = (f"generate, SmolLM2-135M-Instruct (fp32), batch {batch}, prompt {length} tokens, {new_tokens} new "
             f"tokens, budget {budget}")
    meta = {"model": "SmolLM2-135M-Instruct", "batch": batch, "prompt": length, "new_tokens": new_tokens,
            "budget": budget, "repeats": repeats}
    suffix = "" if list(policies) == list(POLICIES) else "_" + ("_".join(policies) or "full")
    return write_results(title, rows, name=f"generate_b{batch}_p{length}{suffix}", meta=meta)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompts", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled rows")
    parser.add_argument("--policies", nargs="*", default=list(POLICIES), choices=POLICIES,
                        help="eviction policies to run at the budget (none: only the full cache)")
    parser.add_argument("--quick", action="store_true", help="smoke run: batch 1, a 256-token prompt, 8 tokens")
    args = parser.parse_args()
    if args.quick:
        args.batches, args.prompts, args.new_tokens, args.budget, args.repeats = [1], [256], 8, 128, 1
    torch.manual_seed(0)
    entry = zoo.load("smollm2")
    for batch in args.batches:
        for length in args.prompts:
            print(run_setting(entry.model, entry.tokenizer, batch, length, args.new_tokens, args.budget,
                              args.repeats, not args.no_compile, args.policies), flush=True)


if __name__ == "__main__":
    main()
