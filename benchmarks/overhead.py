"""Capture + canonicalization is free: the foundation must cost nothing at run time.

Every dynasparse pass builds on the captured, canonicalized graph, so any speedup a pass claims is
only honest if that graph, with no pass applied, runs as fast as the original model (within noise)
and computes the same thing. This times it on real text through the real MiniLM next to eager,
Inductor, dynasparse-under-Inductor and ONNX Runtime on the exported file.

    python benchmarks/overhead.py [--quick]      (or: python -m benchmarks.overhead)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

try:
    import benchmarks  # noqa: F401
except ImportError:  # run as a file: put the repo root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dynasparse
from dynasparse.harness import zoo
from dynasparse.harness.bench import Case, Row, compare, write_results
from dynasparse.export.onnx import export_onnx
from dynasparse.runtime.ort import ort_session


def quality(hidden: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    cosine = (zoo.sentence_embeddings(hidden, mask) * zoo.sentence_embeddings(reference, mask)).sum(-1)
    return {"max_abs_diff": (hidden - reference).abs().max().item(), "min_cosine": cosine.min().item()}


def run_seq(model: torch.nn.Module, inputs: dict[str, torch.Tensor], repeats: int, tmp: Path) -> list[Row]:
    """Time eager against the four runs of the same model on one fixed-shape batch; ``tmp`` holds the ONNX file."""
    torch._dynamo.reset()  # fresh, static-shape compiles for this shape
    optimized = dynasparse.optimize(model, [], example_kwargs=inputs)
    onnx_path = export_onnx(optimized, tmp / "minilm.onnx")
    candidates: dict[str, Callable[..., Any]] = {
        "dynasparse graph": optimized,
        "inductor": torch.compile(model, backend="inductor"),
        "dynasparse + inductor": torch.compile(model, backend="dynasparse"),
        "onnxruntime": ort_session(onnx_path, threads=torch.get_num_threads()),
    }

    def eager() -> Any:
        with torch.no_grad():
            return model(**inputs)

    mask = inputs["attention_mask"]
    with torch.inference_mode():  # the mode compare() times in, so the compiled graphs are not recompiled
        reference = eager()[0]
        cases = [Case(name, lambda fn=fn: fn(**inputs), quality(fn(**inputs)[0], reference, mask))
                 for name, fn in candidates.items()]
    return compare(Case("eager (HF)", eager), cases, warmup=2, repeats=repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="smoke run: seq 32, batch 2, 2 repeats")
    args = parser.parse_args()
    if args.quick:
        args.seq_lens, args.batch, args.repeats = [32], 2, 2

    minilm = zoo.load_minilm()
    texts = zoo.paragraphs(200)[: args.batch]
    for seq in args.seq_lens:
        inputs = dict(minilm.tokenizer(texts, truncation=True, max_length=seq, padding="max_length",
                                       return_tensors="pt"))
        with tempfile.TemporaryDirectory() as tmp:
            rows = run_seq(minilm.model, inputs, args.repeats, Path(tmp))
        meta = {"model": "all-MiniLM-L6-v2 (pretrained)", "text": "pydoc_data.topics paragraphs",
                "batch": args.batch, "seq_len": seq, "repeats": args.repeats,
                "real_tokens": int(inputs["attention_mask"].sum())}
        title = f"Overhead of capture + canonicalization: MiniLM, batch {args.batch}, seq {seq}"
        print(write_results(title, rows, name=f"overhead_minilm_s{seq}_b{args.batch}", meta=meta))


if __name__ == "__main__":
    main()
