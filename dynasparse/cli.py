"""dynasparse: dynamic-sparsity compiler passes for transformers, from the command line.

MODEL is one of the zoo names (smollm2, minilm, llama-tiny, ...), a Hugging Face model directory (a folder
with config.json), a .gguf file, or module:attr naming a torch.nn.Module. Everything runs offline.

  dynasparse generate smollm2 --chat --prompt "..." --kv kvzip:0.25 --kv-unit bytes
  dynasparse generate smollm2 --chat --prompt "..." --kv kvzip:0.25 --kv-unit bytes --tier-bits 4
  dynasparse optimize llama-tiny --config configs.json
  dynasparse demo
"""
from __future__ import annotations

import argparse
import dataclasses
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
    if not Path(path).is_file():
        raise DynasparseError(f"--config {path}: no such file; give a JSON file holding one config or a list of "
                              "them (what BaseConfig.to_json writes)")
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise DynasparseError(f"--config {path} is not JSON ({err})") from None
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


KV_HELP = (f"POLICY:BUDGET or full (default). POLICY: {', '.join(p for p in sorted(POLICIES) if p != 'full')}. "
           "BUDGET: a share of the sequence (prompt + new tokens), e.g. 0.25, or a number of tokens, e.g. 1024; "
           "a share s keeps what kvpress calls compression_ratio = 1 - s. kvzip re-reads the prompt to score it "
           "(about two more prefills, told to repeat the context) and keeps facts best")


def parse_kv(text: str, unit: str = "tokens", head_scores: str | None = None,
             retrieval_heads: float = 0.25, tier_bits: int | None = None,
             other_heads: str = "streaming") -> KVEvictionConfig:
    """``POLICY:BUDGET`` (``h2o:0.25`` a share of the sequence, ``streaming:1024`` tokens) or ``full``."""
    policy, sep, budget = text.partition(":")
    usage = f"--kv {text!r}: give POLICY:BUDGET, e.g. kvzip:0.25 or streaming:1024, or full. {KV_HELP}"
    if policy not in POLICIES or (policy != "full") != bool(sep):
        raise DynasparseError(usage)
    if policy == "full":
        return KVEvictionConfig(policy="full")
    try:
        value = float(budget) if "." in budget else int(budget)
    except ValueError:
        raise DynasparseError(usage) from None
    return KVEvictionConfig(policy=policy, budget=value, unit=unit, head_scores=head_scores,
                            retrieval_heads=retrieval_heads, tier_bits=tier_bits, other_heads=other_heads)


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
    from dynasparse.runtime.reread import repeat_prompt

    auto_heads = args.head_scores == "auto"
    kv = parse_kv(args.kv, args.kv_unit, None if auto_heads else args.head_scores, args.retrieval_heads,
                  args.tier_bits, args.other_heads)
    text = _prompt_text(args)
    configs = _load_configs(args.config)
    entry = zoo.load(args.model, dtype=getattr(torch, args.dtype))
    entry.model.to(args.device)
    if auto_heads and kv.policy != "full":
        from dynasparse.passes.retrieval_heads import cached_head_scores

        folder = zoo.cache_dir() / Path(args.model).stem
        kv = dataclasses.replace(kv, head_scores=str(cached_head_scores(entry.model, entry.tokenizer, folder)))
    if any(isinstance(c, KVEvictionConfig) for c in configs):
        if args.kv != "full":
            raise DynasparseError("--config holds a KVEvictionConfig and --kv gives another: give one of them")
        kv = next(c for c in configs if isinstance(c, KVEvictionConfig))
    configs = [c for c in configs if not isinstance(c, KVEvictionConfig)]
    tokenizer = entry.tokenizer
    if tokenizer is None:
        raise DynasparseError(f"{args.model} has no tokenizer; generate needs a pretrained causal LM: smollm2, a "
                              "Hugging Face model directory or a .gguf file")
    if kv.policy == "kvzip" and kv.compress == "after_prefill" and not kv.reread_prefix:  # KVzip's repeat instruction
        kv = dataclasses.replace(kv, reread_prefix=repeat_prompt(tokenizer))
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise DynasparseError(f"{args.model}'s tokenizer has no chat template; drop --chat")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(text, return_tensors="pt").input_ids
    ids = ids.to(args.device)
    stream = TextStream(tokenizer)
    generator = torch.Generator().manual_seed(args.seed)
    out = generate(entry.model, ids, max_new_tokens=args.max_new_tokens, kv=kv, configs=configs,
                   temperature=args.temperature,
                   top_p=args.top_p, eos_token_id=tokenizer.eos_token_id, stream=stream, progress=True,
                   generator=generator, compile=args.compile)
    stats = out.stats
    print(flush=True)
    rows = [["prompt tokens", stats.prompt_tokens], ["new tokens", stats.new_tokens],
            ["prefill seconds", f"{stats.prefill_seconds:.2f}"],
            ["decode tokens/s", f"{stats.decode_tokens_per_second:.1f}"],
            ["KV cache MiB (every byte held)", f"{stats.cache_allocated_bytes / 2**20:.2f}"],
            ["full cache MiB (K/V, same dtype)", f"{stats.cache_full_bytes / 2**20:.2f}"],
            ["KV cache share of the full cache", f"{stats.cache_allocated_bytes / stats.cache_full_bytes:.1%}"],
            ["KV cache MiB during prefill", f"{stats.cache_prefill_bytes / 2**20:.1f}"]]
    title = f"{args.model}, {kv.policy} cache" + ("" if kv.head_scores is None else " (retrieval heads)")
    print("\n" + table([title + (", compiled" if args.compile else ""), ""], rows),
          file=sys.stderr)


def cmd_demo(args) -> None:
    from dynasparse.harness.demo import run_demo

    run_demo(plot=args.plot)


def main(argv: list[str] | None = None) -> int:
    from dynasparse.harness.zoo import NAMES

    parser = argparse.ArgumentParser(prog="dynasparse", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
    gen.add_argument("model", help="MODEL: smollm2, a Hugging Face model directory or a .gguf file")
    gen.add_argument("--prompt", help="the prompt text")
    gen.add_argument("--prompt-file", help="read the prompt from this file")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--kv", default="full", help=KV_HELP)
    gen.add_argument("--kv-unit", default="tokens", choices=["tokens", "bytes"],
                     help="bytes: a share BUDGET is of the full cache's bytes, counting every byte the bounded "
                          "cache holds (keys, values, positions, scores)")
    gen.add_argument("--head-scores", metavar="JSON|auto",
                     help="retrieval-head scores (calibrate_retrieval_heads); auto: compute once and cache. The "
                          "top --retrieval-heads share of KV heads keep BUDGET, the rest sinks + a recent window")
    gen.add_argument("--retrieval-heads", type=float, default=0.25, help="share of KV heads that keep the budget")
    gen.add_argument("--other-heads", default="streaming", choices=["streaming", "policy"],
                     help="with --head-scores: what the KV heads outside the retrieval share keep. streaming: sinks "
                          "+ a recent window; policy: the retrieval heads keep every token and the others evict "
                          "under POLICY in what BUDGET leaves")
    gen.add_argument("--tier-bits", type=int, choices=[2, 4, 8],
                     help="keep what leaves the cache quantized to this many bits (KIVI), inside the same BUDGET")
    gen.add_argument("--config", help="JSON file: more configs (sparse attention, exit gates, a KV config)")
    gen.add_argument("--device", default="cpu", help="cpu (default) or cuda")
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
    except ModuleNotFoundError as err:
        if err.name not in ("transformers", "gguf", "accelerate"):
            raise
        print(f"dynasparse: error: this command needs the package {err.name}: pip install 'dynasparse[smollm]' "
              "(transformers, gguf, accelerate)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
