"""``dynasparse inspect | optimize | export | generate | demo`` (also ``python -m dynasparse``)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dynasparse.config import BaseConfig
from dynasparse.errors import DynasparseError
from dynasparse.kernels.policies import POLICIES
from dynasparse.passes.kv_eviction import KVEvictionConfig
from dynasparse.table import table


def cmd_inspect(args) -> None:
    from dynasparse.harness import zoo
    from dynasparse.passes.report import blocks_table, sites_table

    _, optimized, seconds = zoo.load_optimized(args.model, args.batch, args.seq_len)
    analysis = optimized.report.analysis
    print(f"{args.model}: {len(analysis.sites)} attention sites, {len(analysis.blocks)} blocks "
          f"(captured in {seconds:.1f}s)\n")
    print(sites_table(analysis) + "\n")
    print(blocks_table(analysis))


def _load_configs(path: str | None) -> list[BaseConfig]:
    if path is None:
        return []
    data = json.loads(Path(path).read_text())
    return [BaseConfig.from_dict(item) for item in (data if isinstance(data, list) else [data])]


def cmd_optimize(args) -> None:
    from dynasparse.harness import zoo

    _, optimized, seconds = zoo.load_optimized(args.model, args.batch, args.seq_len, _load_configs(args.config))
    print(optimized.report)
    print(f"\n(optimized in {seconds:.1f}s)")


def cmd_export(args) -> None:
    from dynasparse.export.onnx import export_onnx
    from dynasparse.harness import zoo
    from dynasparse.harness.parity import onnx_parity_table

    entry, optimized, _ = zoo.load_optimized(args.model, args.batch, args.seq_len, _load_configs(args.config))
    path = export_onnx(optimized, args.output)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    print(onnx_parity_table(entry, optimized, path, args.batch, args.seq_len))


def parse_kv(text: str) -> KVEvictionConfig:
    """``POLICY:BUDGET`` (``h2o:0.25`` a share of the sequence, ``streaming:1024`` tokens) or ``full``."""
    policy, sep, budget = text.partition(":")
    usage = (f"--kv {text!r}: give POLICY:BUDGET, e.g. h2o:0.25 (a share of the sequence) or streaming:1024 "
             f"(tokens), or full; policies: {', '.join(sorted(POLICIES))}")
    if policy not in POLICIES or (policy != "full") != bool(sep):
        raise DynasparseError(usage)
    if policy == "full":
        return KVEvictionConfig(policy="full")
    try:
        value = float(budget) if "." in budget else int(budget)
    except ValueError:
        raise DynasparseError(usage) from None
    return KVEvictionConfig(policy=policy, budget=value)


def _prompt_text(args) -> str:
    if (args.prompt is None) == (args.prompt_file is None):
        raise DynasparseError("give the prompt as --prompt TEXT or --prompt-file PATH (one of them)")
    if args.prompt is not None:
        return args.prompt
    path = Path(args.prompt_file)
    if not path.is_file():
        raise DynasparseError(f"--prompt-file {path}: no such file")
    return path.read_text()


class TextStream:
    """Writes a row's newly generated text to a file as tokens arrive (decoding the whole answer each time,
    so characters that span tokens come out whole)."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out, self.tokens, self.shown = tokenizer, out or sys.stdout, [], ""

    def __call__(self, token: torch.Tensor) -> None:
        self.tokens.append(int(token[0]))
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.startswith(self.shown):
            self.out.write(text[len(self.shown):])
            self.out.flush()
            self.shown = text


def cmd_generate(args) -> None:
    from dynasparse.harness import zoo
    from dynasparse.runtime.generate import generate

    kv = parse_kv(args.kv)
    text = _prompt_text(args)
    entry = zoo.load(args.model, dtype=getattr(torch, args.dtype))
    tokenizer = entry.tokenizer
    if tokenizer is None:
        raise DynasparseError(f"{args.model} has no tokenizer; generate needs a pretrained causal LM: smollm2, a "
                              "Hugging Face model directory or a .gguf file")
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise DynasparseError(f"{args.model}'s tokenizer has no chat template; drop --chat")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(text, return_tensors="pt").input_ids
    stream = TextStream(tokenizer)
    generator = torch.Generator().manual_seed(args.seed)
    out = generate(entry.model, ids, max_new_tokens=args.max_new_tokens, kv=kv, temperature=args.temperature,
                   top_p=args.top_p, eos_token_id=tokenizer.eos_token_id, stream=stream, progress=True,
                   generator=generator, compile=args.compile)
    stats = out.stats
    print(flush=True)
    rows = [["prompt tokens", stats.prompt_tokens], ["new tokens", stats.new_tokens],
            ["prefill seconds", f"{stats.prefill_seconds:.2f}"],
            ["decode tokens/s", f"{stats.decode_tokens_per_second:.1f}"],
            ["KV cache MiB", f"{stats.cache_allocated_bytes / 2**20:.1f} (full cache: "
                             f"{stats.cache_full_bytes / 2**20:.1f})"],
            ["KV cache MiB during prefill", f"{stats.cache_prefill_bytes / 2**20:.1f}"]]
    print("\n" + table([f"{args.model}, {kv.policy} cache" + (", compiled" if args.compile else ""), ""], rows),
          file=sys.stderr)


def cmd_demo(args) -> None:
    from dynasparse.harness.demo import run_demo

    run_demo(plot=args.plot)


def main(argv: list[str] | None = None) -> int:
    from dynasparse.harness.zoo import NAMES

    parser = argparse.ArgumentParser(prog="dynasparse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    model_help = f"one of {', '.join(NAMES)}, a Hugging Face model directory, a .gguf file, or module:attr"
    for name, fn, text in [("inspect", cmd_inspect, "attention sites and blocks of a model"),
                           ("optimize", cmd_optimize, "apply configs and print the optimization report"),
                           ("export", cmd_export, "export to ONNX and check parity in ONNX Runtime")]:
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("model", help=model_help)
        cmd.add_argument("--batch", type=int, default=2)
        cmd.add_argument("--seq-len", type=int, default=32)
        if name != "inspect":
            cmd.add_argument("--config", help="JSON file: one config or a list (see BaseConfig.to_json)")
        if name == "export":
            cmd.add_argument("output", help="path of the .onnx file to write")
        cmd.set_defaults(fn=fn)
    gen = sub.add_parser("generate", help="generate text with a bounded KV cache, streamed to stdout")
    gen.add_argument("model", help="smollm2, a Hugging Face model directory or a .gguf file")
    gen.add_argument("--prompt", help="the prompt text")
    gen.add_argument("--prompt-file", help="read the prompt from this file")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--kv", default="full", help="POLICY:BUDGET, e.g. h2o:0.25 or streaming:1024 (default: full)")
    gen.add_argument("--compile", action="store_true", help="compile the prefill and decode graphs first")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    gen.set_defaults(fn=cmd_generate)
    demo = sub.add_parser("demo", help="MiniLM and a model from config: capture, report, ONNX parity, "
                                       "token-merge speed/fidelity; SmolLM2 answering from a long prompt")
    demo.add_argument("--plot", metavar="PNG", help="also sweep keep ratios (dynasparse vs plain ToMe) and "
                                                    "write the speed-vs-fidelity curve to this PNG")
    demo.set_defaults(fn=cmd_demo)
    args = parser.parse_args(argv)
    try:
        args.fn(args)
    except DynasparseError as err:
        print(f"dynasparse: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
