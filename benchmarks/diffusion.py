"""Token density by layer and timestep on diffusers' DiT, beside the dense model in one run (issue 27).

Speed: ``DiTTransformer2DModel`` at DiT-S/2 size (12 blocks, d=384, 6 heads) on 512 px images (64x64 latents
in patches of 2: 1,024 tokens), class-conditional, random weights (the time of a forward does not depend on
them). Every row samples the same noise with ``dynasparse.sample`` (DDIM, ``--steps`` steps, a batch of
``--batch``); the table gives the mean seconds per denoising step, the speedup over the dense model, and the
tokens each band keeps after the last merge. Rows alternate, median of ``--repeats`` runs. Fidelity needs
trained weights: the DiT trained on scikit-learn's digits (PSNR against the dense samples) is the next part.

    python -m benchmarks.diffusion [--steps 10] [--batch 2] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

try:
    import benchmarks  # noqa: F401
except ImportError:  # run as a file: put the repo root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dynasparse
from dynasparse import TokenMergeConfig
from dynasparse.table import table

OUT = Path("benchmarks") / "results"
EARLY = (1, 2, 3)  # blocks that merge when the ratio is reached early: every later block runs on fewer tokens

ROWS = {
    "keep 0.5 over blocks 1-11 (the issue's first try)": TokenMergeConfig(keep_ratio=0.5),
    "keep 0.25 by block 3": TokenMergeConfig(keep_ratio=0.25, layers=EARLY),
    "keep 0.5 by block 3": TokenMergeConfig(keep_ratio=0.5, layers=EARLY),
    "by timestep: t >= 500 every token, below keep 0.25 by block 3":
        TokenMergeConfig(timestep_schedule=((0, 0.25), (500, 1.0)), layers=EARLY),
    "by timestep: t >= 700 keep 0.5, below keep 0.25 by block 3":
        TokenMergeConfig(timestep_schedule=((0, 0.25), (700, 0.5)), layers=EARLY),
}


def dit_s2() -> torch.nn.Module:
    import diffusers

    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(num_attention_heads=6, attention_head_dim=64, in_channels=4,
                                           out_channels=8, num_layers=12, sample_size=64, patch_size=2,
                                           num_embeds_ada_norm=1000, norm_type="ada_norm_zero").eval()


def _kept(optimized) -> str:
    """Tokens after the last merge, per band, from the report's notes."""
    lines = [line.strip() for line in str(optimized.report).splitlines() if "keep by timestep" in line
             or "tokens after the last merge" in line]
    return "; ".join(line.removeprefix("token_merge: ") for line in lines)


def speed_part(steps: int, batch: int, repeats: int) -> str:
    model = dit_s2()
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(batch, 4, 64, 64, generator=generator)
    conditioning = {"class_labels": torch.arange(batch) % 1000}
    example = {"hidden_states": noise, "timestep": torch.full((batch,), 500), **conditioning}
    runners = {"dense model": model}
    notes = {"dense model": "1024 tokens"}
    for name, config in ROWS.items():
        runners[name] = dynasparse.optimize(model, [config], example_kwargs=example)
        notes[name] = _kept(runners[name])
    with torch.no_grad():  # first calls pay one-time setup (kernels loaded, buffers allocated)
        for runner in runners.values():
            runner(**example)
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):  # alternate the rows: the machine's speed drifts between runs
        for name, runner in runners.items():
            run = dynasparse.sample(runner, noise, steps=steps, conditioning=conditioning, progress=False)
            seconds[name].append(run.stats.total_seconds / steps)
    dense = statistics.median(seconds["dense model"])
    rows = []
    for name in runners:
        per_step = statistics.median(seconds[name])
        rows.append([name, f"{per_step:.3f}", f"{dense / per_step:.2f}x", notes[name]])
    header = ["model", "s / denoising step", "vs dense", "tokens kept"]
    title = (f"DiT-S/2 (diffusers DiTTransformer2DModel, 12 blocks, d=384, 1,024 tokens), random weights, DDIM "
             f"{steps} steps, batch {batch}, {torch.get_num_threads()} CPU threads, median of {repeats} runs "
             "(rows alternate)")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "diffusion_speed.json").write_text(json.dumps(
        {"title": title, "header": header, "rows": rows, "seconds": seconds}, indent=2) + "\n")
    markdown = f"# {title}\n\n" + table(header, rows, markdown=True)
    (OUT / "diffusion_speed.md").write_text(markdown)
    return markdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(speed_part(args.steps, args.batch, args.repeats))


if __name__ == "__main__":
    main()
