"""The row-sparse matmul kernel (``kernels/row_sparse_cpu.cpp``) against the dense matmul a model runs, on
SmolLM2's MLP shapes at batch 1 (a decode step), by the share of input channels below the threshold.

Each case multiplies one row by 30 distinct weights (a model's worth of MLPs, so weights come from memory,
as in decode, not from cache): the baseline is ``F.linear`` on the thresholded input (MKL's GEMV reads every
weight byte), ours is ``dynasparse::row_sparse_linear`` on an input-major copy (reads the kept rows only).

    python -m benchmarks.row_sparse [--repeats 9]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import benchmarks  # noqa: F401
except ImportError:  # run as a file: put the repo root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dynasparse.harness.bench import Case, compare, write_results
from dynasparse.ir.ops import CHANNEL_SPARSIFY, ROW_SPARSE_LINEAR
from dynasparse.kernels.mlp_width import threshold_for

SHAPES = {"gate / up (576 -> 1536)": (576, 1536), "down (1536 -> 576)": (1536, 576)}
LAYERS = 30


def cases(channels: int, width: int, share: float) -> tuple[Case, Case]:
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(width, channels, generator=generator) / channels ** 0.5 for _ in range(LAYERS)]
    inputs_major = [w.t().contiguous() for w in weights]
    x = torch.randn(1, channels, generator=generator)
    threshold = threshold_for(x.abs().flatten().sort().values, share)
    kept = CHANNEL_SPARSIFY(x, threshold)
    error = max(float((ROW_SPARSE_LINEAR(x, t, None, threshold) - F.linear(kept, w)).abs().max())
                for w, t in zip(weights, inputs_major))
    dense = Case("dense F.linear (MKL)", lambda: [F.linear(kept, w) for w in weights])
    ours = Case("row_sparse_linear", lambda: [ROW_SPARSE_LINEAR(x, t, None, threshold) for t in inputs_major],
                quality={"max abs error": error})
    return dense, ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.2, 0.35, 0.5])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    rows = []
    for shape, (channels, width) in SHAPES.items():
        for share in args.shares:
            dense, ours = cases(channels, width, share)
            for row in compare(dense, [ours], repeats=args.repeats, measure_memory=False):
                row.name = f"{shape}, {share:.0%} below threshold: {row.name}"
                rows.append(row)
    title = (f"Row-sparse matmul vs dense, batch 1, {LAYERS} weights per call, fp32, "
             f"{torch.get_num_threads()} CPU threads")
    print(write_results(title, rows, name="row_sparse"))


if __name__ == "__main__":
    main()
