"""Learned MLP skipping and MLP width on the real SmolLM2-135M-Instruct, against the full model in one run.

For each target share of MLP token-work to skip, ``dynasparse.fit`` trains the routers and adapters of
``MLPSkipConfig`` on the frozen model (stdlib sources, never ``inspect.py``; cached beside the model); for
each target share of MLP multiply-adds, it sets the thresholds of ``MLPWidthConfig`` (TEAL) on the same
text. Then, for each:

* quality: perplexity of held-out ``inspect.py`` (rows of ``--context`` tokens) with the fitted routers,
  against the full model, and the share of tokens each block's MLP skipped there;
* speed: ``dynasparse.generate`` over the same prompts (``--batch`` rows of ``--prompt`` tokens of
  ``inspect.py``, ``--new-tokens`` greedy tokens), prefill seconds and decode tokens/s, against the full
  model through the same runtime, alternating, median of ``--repeats``; and how many generated tokens
  equal the full model's;
* oracle rows: what skipping could reach if a router read each MLP's true output (the tokens whose MLP
  output is smallest, or best predicted by a full-rank linear map that then stands in), an upper bound.

    python -m benchmarks.mlp_skip [--targets 0.05 0.1 0.25] [--width-targets 0.25 0.3] [--steps 120] [--quick]
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import inspect
import json
import os
import random
import statistics
import sys
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import benchmarks  # noqa: F401
except ImportError:  # run as a file: put the repo root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dynasparse
from dynasparse import MLPSkipConfig, MLPWidthConfig
from dynasparse.fit import skipped_per_gate
from dynasparse.passes.mlp_width import skipped_per_block as skipped_multiply_adds, width_plan
from dynasparse.harness import zoo
from dynasparse.table import table

OUT = Path("benchmarks") / "results"
TRAIN_TOKENS = 128  # tokens per training row
WIDTH_ROWS = 36  # training rows the width thresholds are set on (4,608 tokens; 4 of them pick the split)


def training_rows(tokenizer, rows: int) -> torch.Tensor:
    """``rows`` rows of stdlib source (shuffled files, ``inspect.py`` left out: it is the held-out text)."""
    files = sorted(f for f in glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))
                   if not f.endswith(os.sep + "inspect.py"))
    random.Random(0).shuffle(files)
    ids: list[int] = []
    for path in files:
        ids += tokenizer(Path(path).read_text(encoding="utf-8", errors="ignore")).input_ids
        if len(ids) >= rows * TRAIN_TOKENS:
            break
    return torch.tensor(ids[:rows * TRAIN_TOKENS]).view(rows, TRAIN_TOKENS)


def fitted_gates(model, tokenizer, target: float, steps: int) -> tuple[str, dict]:
    """The routers fitted for ``target`` (cached with their fit report)."""
    path = zoo.cache_dir() / "smollm2" / f"mlp_skip_{target:g}_{steps}.safetensors"
    report_path = path.with_name(path.name + ".report.json")
    if not report_path.exists():
        rows = training_rows(tokenizer, 4 * steps // 2 + 16)
        optimized = dynasparse.optimize(model, MLPSkipConfig(target_skip=target),
                                        example_kwargs={"input_ids": rows[:2]})
        report = dynasparse.fit(optimized, rows, steps=steps, save=path, progress=True)
        report_path.write_text(json.dumps(report.to_dict()))
    return str(path), json.loads(report_path.read_text())


def fitted_widths(model, tokenizer, target: float) -> tuple[str, dict]:
    """The width thresholds set for ``target`` (cached with their fit report)."""
    path = zoo.cache_dir() / "smollm2" / f"mlp_width_{target:g}.safetensors"
    report_path = path.with_name(path.name + ".report.json")
    if not report_path.exists():
        rows = training_rows(tokenizer, WIDTH_ROWS)
        optimized = dynasparse.optimize(model, MLPWidthConfig(target_skip=target),
                                        example_kwargs={"input_ids": rows[:2]})
        report = dynasparse.fit(optimized, rows, save=path, progress=True)
        report_path.write_text(json.dumps(report.to_dict()))
    return str(path), json.loads(report_path.read_text())


@torch.no_grad()
def perplexity(model, held_out: torch.Tensor) -> float:
    logits = model(input_ids=held_out).logits
    return float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), held_out[:, 1:].flatten()).exp())


def skipped_per_block(model, config, optimized, held_out: torch.Tensor) -> list[float]:
    """Share of held-out tokens each routed block's MLP skipped (routers, read from ``optimized``), or of its
    multiply-adds (widths, counted on a capture that keeps its threshold calls: the same values), in block
    order."""
    if isinstance(config, MLPWidthConfig):
        counted = dynasparse.optimize(model, dataclasses.replace(config, row_sparse=False),
                                      example_kwargs={"input_ids": held_out[:2]})
        shares = skipped_multiply_adds(counted.graph_module, width_plan(counted.graph_module),
                                       lambda ids: counted(input_ids=ids), held_out)[1]
    else:
        shares = skipped_per_gate(optimized, held_out)
    return [shares[name] for name in sorted(shares, key=lambda n: int(n.rsplit("_", 1)[-1].split()[-1]))]


@torch.no_grad()
def oracle_rows(model, tokenizer, held_out: torch.Tensor, full_ppl: float, shares: list[float],
                columns: int) -> list[list[str]]:
    """Upper bounds no router reaches, since they read each MLP's true output: per block (1..28), skip the
    share of tokens whose MLP output is smallest (relative to its input), or is best predicted by a
    full-rank least-squares linear map of its input (fitted on training rows), which then stands in."""
    mlps = [layer.mlp for layer in model.model.layers]
    inner = [mlp.forward for mlp in mlps]
    captured: dict[int, list] = {i: [] for i in range(len(mlps))}
    state = {"mode": "collect", "share": 0.0}
    maps: dict[int, torch.Tensor] = {}

    def wrapped(i):
        def forward(x):
            out = inner[i](x)
            if state["mode"] == "collect":
                captured[i].append((x.flatten(0, -2), out.flatten(0, -2)))
                return out
            if not 1 <= i <= len(mlps) - 2:
                return out
            if state["mode"] == "norm":
                error, stand_in = out.norm(dim=-1) / x.norm(dim=-1), torch.zeros_like(out)
            else:
                stand_in = torch.cat([x, torch.ones_like(x[..., :1])], -1) @ maps[i]
                error = (out - stand_in).norm(dim=-1)
            skip = error <= torch.quantile(error.flatten().float(), state["share"])
            return torch.where(skip[..., None], stand_in, out)
        return forward

    for i, mlp in enumerate(mlps):
        mlp.forward = wrapped(i)
    try:
        model(input_ids=training_rows(tokenizer, 32))
        for i, pairs in captured.items():
            x = torch.cat([a for a, _ in pairs])
            x = torch.cat([x, torch.ones_like(x[:, :1])], -1)
            y = torch.cat([b for _, b in pairs])
            maps[i] = torch.linalg.solve(x.T @ x + 1e-3 * x.pow(2).mean() * torch.eye(x.shape[1]), x.T @ y)
        rows = []
        for mode, name in (("norm", "oracle: skip the smallest MLP outputs"),
                           ("linear", "oracle: skip where a full-rank linear map predicts the MLP best")):
            for share in shares:
                state.update(mode=mode, share=share)
                ppl = perplexity(model, held_out)
                total = share * (len(mlps) - 2) / len(mlps)
                rows.append([f"{name}, {share:.0%} of blocks 1..28", f"{total:.1%}",
                             f"{ppl:.2f} ({ppl / full_ppl - 1:+.1%})", *["-"] * (columns - 3)])
                print(rows[-1], flush=True)
        return rows
    finally:
        for i, mlp in enumerate(mlps):
            mlp.forward = inner[i]


def timed(model, prompts: torch.Tensor, new_tokens: int, configs: list) -> tuple[float, float, torch.Tensor]:
    out = dynasparse.generate(model, prompts, max_new_tokens=new_tokens, configs=configs)
    return out.stats.prefill_seconds, out.stats.decode_tokens_per_second, out.sequences[:, prompts.shape[1]:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=float, nargs="*", default=[0.05, 0.1, 0.25],
                        help="shares of MLP token-work for MLPSkipConfig's routers")
    parser.add_argument("--width-targets", type=float, nargs="*", default=[0.25, 0.3],
                        help="shares of MLP multiply-adds for MLPWidthConfig's thresholds")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--fit-only", action="store_true", help="fit (and cache) the routers, measure nothing")
    parser.add_argument("--oracle", type=float, nargs="*", default=[0.1, 0.25],
                        help="shares for the oracle rows (upper bounds that read each MLP's true output)")
    parser.add_argument("--context", type=int, default=512, help="tokens per held-out perplexity row")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="batch sizes to time")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smoke run: 5 fit steps, short texts, one repeat")
    args = parser.parse_args()
    if args.quick:
        args.targets, args.steps, args.context, args.prompt, args.new_tokens, args.repeats = [0.25], 5, 64, 64, 4, 1
        args.width_targets = [0.25]
    entry = zoo.load("smollm2")
    model, tokenizer = entry.model, entry.tokenizer
    if args.fit_only:
        for target in args.targets:
            print(target, fitted_gates(model, tokenizer, target, args.steps)[1]["held_out_kl"], flush=True)
        for target in args.width_targets:
            print(target, fitted_widths(model, tokenizer, target)[1]["held_out_kl"], flush=True)
        return
    source = tokenizer(inspect.getsource(inspect), return_tensors="pt").input_ids[0]
    held_out = source[:4 * args.context].view(4, args.context)
    prompts = source[-max(args.batch) * args.prompt:].view(max(args.batch), args.prompt)
    full_ppl = perplexity(model, held_out)
    rows = [["full model", "-", f"{full_ppl:.2f} (+0.0%)", "-", *["-"] * (2 * len(args.batch)), "-", "-"]]
    data = {"full model": {"perplexity": full_ppl}}
    methods = [(f"MLP skipping, fitted for {t:.0%}", MLPSkipConfig, t, fitted_gates(model, tokenizer, t, args.steps))
               for t in args.targets]
    methods += [(f"MLP width (TEAL thresholds), set for {t:.0%}", MLPWidthConfig, t, fitted_widths(model, tokenizer, t))
                for t in args.width_targets]
    for name, config_type, target, (path, report) in methods:
        config = config_type(target_skip=target, fitted=path)
        optimized = dynasparse.optimize(model, config, example_kwargs={"input_ids": held_out[:2]})
        ppl = perplexity(optimized, held_out)
        per_block = skipped_per_block(model, config, optimized, held_out)
        speed, equal = {}, []
        for batch in args.batch:
            timings = {"full": [], "ours": []}
            for _ in range(args.repeats):  # alternating, so drift hits both
                timings["full"].append(timed(model, prompts[:batch], args.new_tokens, []))
                timings["ours"].append(timed(model, prompts[:batch], args.new_tokens, [config]))
            speed[batch] = {f"{key}{suffix}": statistics.median(t[i] for t in timings[run])
                            for run, key in (("full", "full_"), ("ours", "")) for i, suffix in
                            ((0, "prefill_s"), (1, "decode_tokens_per_s"))}
            equal.append(timings["ours"][-1][2] == timings["full"][-1][2])
        equal = float(torch.cat(equal).float().mean())
        skipped = sum(per_block) / len(per_block)
        fit_time = report["seconds"]
        rows.append([name, f"{skipped:.1%}", f"{ppl:.2f} ({ppl / full_ppl - 1:+.1%})",
                     f"{fit_time / 60:.1f} min" if fit_time >= 60 else f"{fit_time:.0f} s",
                     *[cell for b in args.batch for cell in (
                         f"{speed[b]['prefill_s']:.2f} s vs {speed[b]['full_prefill_s']:.2f} s",
                         f"{speed[b]['decode_tokens_per_s']:.1f} vs {speed[b]['full_decode_tokens_per_s']:.1f}")],
                     f"{equal:.0%}", " ".join(f"{s:.0%}" for s in per_block)])
        data[name] = {"target": target, "skipped": skipped, "skipped_per_block": per_block, "perplexity": ppl,
                      "fit": report, "speed_by_batch": speed, "tokens_equal_to_full": equal}
        print(rows[-1], flush=True)
    header = ["model", "MLP work skipped (tokens or multiply-adds)", "perplexity (vs full)", "fit time",
              *[c for b in args.batch
                for c in (f"prefill, batch {b} (vs full)", f"decode tokens/s, batch {b} (vs full)")],
              "tokens equal to full", "skipped per block (0..29)"]
    rows += oracle_rows(model, tokenizer, held_out, full_ppl, args.oracle, len(header)) if args.oracle else []
    title = (f"Learned MLP skipping and MLP width, SmolLM2-135M-Instruct (fp32, eager, {torch.get_num_threads()} CPU "
             f"threads): routers + rank-{MLPSkipConfig().adapter_rank} adapters fitted by dynasparse.fit "
             f"({args.steps} steps of 4 x {TRAIN_TOKENS} stdlib tokens, KL to the frozen model); width thresholds set "
             f"by dynasparse.fit on {WIDTH_ROWS} x {TRAIN_TOKENS} stdlib tokens; perplexity of 4 x {args.context} "
             f"held-out inspect.py tokens; speed: dynasparse.generate, {args.prompt}-token prompts, "
             f"{args.new_tokens} new tokens, median of {args.repeats}, against the full model in the same run")
    markdown = f"# {title}\n\n" + table(header, rows, markdown=True)
    OUT.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (OUT / f"mlp_skip{suffix}.md").write_text(markdown)
    (OUT / f"mlp_skip{suffix}.json").write_text(json.dumps({"title": title, "rows": data}, indent=2))
    print(markdown)


if __name__ == "__main__":
    main()
