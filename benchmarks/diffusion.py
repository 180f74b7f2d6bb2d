"""Token density by layer and timestep on diffusers' DiT, beside the dense model in one run (issue 27).

1. speed: ``DiTTransformer2DModel`` at DiT-S/2 size (12 blocks, d=384, 6 heads) on 512 px images (64x64
   latents in patches of 2: 1,024 tokens), class-conditional, random weights (the time of a forward does not
   depend on them). Every row samples the same noise with ``dynasparse.sample`` (DDIM, ``--steps`` steps, a
   batch of ``--batch``); the table gives the mean seconds per denoising step, the speedup over the dense
   model, and the tokens each band keeps after the last merge. Rows alternate, median of ``--repeats`` runs.
2. fidelity: the same settings on a small DiT trained here on scikit-learn's digits (class-conditional, 8x8
   images in patches of 1: 64 tokens; cached like the digits ViT of ``benchmarks/early_exit.py``). Each row
   samples 10 images per class from the same noise as the dense model (DDIM, ``--fidelity-steps`` steps)
   and gives the PSNR and mean squared error of its samples against the dense model's (pixels in [0, 1]),
   and the share of samples the digits ViT labels as their class. A row whose schedule says ``None`` is
   calibrated on the digits model (``max_output_error``) and timed with the keep ratios it chose.
The token-sparse rows (``SparseAttentionConfig(token_keep=...)``) keep every token but let each attention
head attend among a share of them. The token-cache rows (``TokenCacheConfig``, RAS) recompute a share of the
tokens per step and let the others keep what the step that last computed them left; their schedule of whole
steps depends on the step count, so time them with ``--steps`` equal to ``--fidelity-steps``.

    python -m benchmarks.diffusion [--parts speed fidelity] [--steps 10] [--batch 2] [--repeats 3]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

try:
    import benchmarks  # noqa: F401
except ImportError:  # run as a file: put the repo root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dynasparse
from benchmarks.early_exit import digits_classifier, digits_split
from dynasparse import SparseAttentionConfig, TokenCacheConfig, TokenMergeConfig
from dynasparse.plans import TIMESTEP_BANDS
from dynasparse.table import table

OUT = Path("benchmarks") / "results"
DIGITS_DIT = Path("~/.cache/dynasparse/dit-digits-v1.pt").expanduser()
CALIBRATED = "by timestep, calibrated on the digits DiT: one step's output within 20% of dense per band"
EARLY = (1, 2, 3)  # blocks that merge when the ratio is reached early: every later block runs on fewer tokens

ROWS = {
    "keep 0.5 over blocks 1-11 (the issue's first try)": TokenMergeConfig(keep_ratio=0.5),
    "keep 0.25 by block 3": TokenMergeConfig(keep_ratio=0.25, layers=EARLY),
    "keep 0.5 by block 3": TokenMergeConfig(keep_ratio=0.5, layers=EARLY),
    "by timestep: t >= 500 every token, below keep 0.25 by block 3":
        TokenMergeConfig(timestep_schedule=((0, 0.25), (500, 1.0)), layers=EARLY),
    "by timestep: t >= 700 keep 0.5, below keep 0.25 by block 3":
        TokenMergeConfig(timestep_schedule=((0, 0.25), (700, 0.5)), layers=EARLY),
    "by timestep: t >= 800 keep 0.25 by block 3, below every token":
        TokenMergeConfig(timestep_schedule=((0, 1.0), (800, 0.25)), layers=EARLY),
    CALIBRATED: TokenMergeConfig(timestep_schedule=((0, None), (300, None), (600, None), (800, None)), layers=EARLY,
                                 max_output_error=0.2),
    # Token Sparse Attention: every block, each KV head attends among a share of the tokens (16 probes spread
    # over the image choose them); the other tokens keep their hidden state through that attention
    "token sparse attention, 75% of the tokens per head": SparseAttentionConfig(token_keep=0.75, min_seq_len=0,
                                                                                  window=16),
    "token sparse attention, 50% of the tokens per head": SparseAttentionConfig(token_keep=0.5, min_seq_len=0,
                                                                                  window=16),
    # token caching (RAS): a cached step recomputes the share of tokens whose prediction moved most, the others
    # keep their keys, values and last block output from the step that last computed them
    "token cache, 30% of the tokens per cached step (first 20% of the steps and every 5th whole)":
        TokenCacheConfig(recompute_ratio=0.3),
    "token cache, 30% of the tokens per cached step (first 10% of the steps and every 10th whole)":
        TokenCacheConfig(recompute_ratio=0.3, warmup=0.1, refresh_every=10),
}


def dit_s2() -> torch.nn.Module:
    import diffusers

    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(num_attention_heads=6, attention_head_dim=64, in_channels=4,
                                           out_channels=8, num_layers=12, sample_size=64, patch_size=2,
                                           num_embeds_ada_norm=1000, norm_type="ada_norm_zero").eval()


def _kept(optimized, run=None) -> str:
    """Tokens after the last merge, per band, from the report's notes (token-sparse rows: per KV head; token
    cache rows: the token-work ``run`` computed)."""
    if run is not None:
        return f"{statistics.mean(run.stats.keep):.0%} of the token-work"
    report = str(optimized.report).splitlines()
    lines = [line.strip() for line in report if "keep by timestep" in line or "tokens after the last merge" in line]
    heads = [line.split(": ", 2)[-1] for line in report if "per KV head" in line][:1]
    return "; ".join([line.removeprefix("token_merge: ") for line in lines] + heads)


def _calibrates(config) -> bool:
    return isinstance(config, TokenMergeConfig) and config.calibrates_schedule


def digits_dit() -> torch.nn.Module:
    import diffusers

    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=24, in_channels=1,
                                           out_channels=1, num_layers=4, sample_size=8, patch_size=1,
                                           num_embeds_ada_norm=10, norm_type="ada_norm_zero")


def trained_digits_dit(steps: int = 3000, batch: int = 64) -> torch.nn.Module:
    """The cached digits DiT, trained first if missing: the DDPM noise loss over 1,000 timesteps on the
    digits' training split scaled to [-1, 1] (a few minutes on 2 cores)."""
    import diffusers

    model = digits_dit()
    if DIGITS_DIT.exists():
        model.load_state_dict(torch.load(DIGITS_DIT, weights_only=True))
        return model.eval()
    images, labels, *_ = digits_split()
    images = images * 2 - 1
    noising = diffusers.DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in tqdm(range(steps), desc="training the digits DiT"):
        picked = torch.randint(len(labels), (batch,), generator=generator)
        noise = torch.randn(batch, 1, 8, 8, generator=generator)
        t = torch.randint(1000, (batch,), generator=generator)
        predicted = model(noising.add_noise(images[picked], noise, t), timestep=t, class_labels=labels[picked]).sample
        loss = F.mse_loss(predicted, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    DIGITS_DIT.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), DIGITS_DIT)
    return model.eval()


def _fidelity_config(config):
    """``config`` for 64 tokens: every token may merge (the default leaves the first 32 alone)."""
    return dataclasses.replace(config, min_tokens=0) if isinstance(config, TokenMergeConfig) else config


def _chosen_schedule(optimized) -> tuple[tuple[float, float], ...]:
    """The (lowest timestep, keep ratio) of each band a calibrated model chose."""
    return tuple((t, keep) for t, keep, _ in optimized.graph_module.meta[TIMESTEP_BANDS].bands)


def fidelity_part(steps: int) -> tuple[str, dict[str, TokenMergeConfig]]:
    """The fidelity table, and the calibrated rows' schedules as fixed configs for the speed part."""
    model, classifier = trained_digits_dit(), digits_classifier()
    labels = torch.arange(10).repeat_interleave(10)
    noise = torch.randn(len(labels), 1, 8, 8, generator=torch.Generator().manual_seed(1))
    conditioning = {"class_labels": labels}
    example = {"hidden_states": noise[:2], "timestep": torch.full((2,), 500), "class_labels": labels[:2]}
    # calibration: training images noised to timesteps across the range, with their labels
    images, train_labels, *_ = digits_split()
    import diffusers

    noising, generator = diffusers.DDPMScheduler(num_train_timesteps=1000), torch.Generator().manual_seed(2)
    calibration = []
    for t in range(50, 1000, 100):
        picked = torch.randint(len(train_labels), (16,), generator=generator)
        noisy = noising.add_noise(images[picked] * 2 - 1, torch.randn(16, 1, 8, 8, generator=generator),
                                  torch.full((16,), t))
        calibration.append({"hidden_states": noisy, "timestep": torch.full((16,), t),
                            "class_labels": train_labels[picked]})

    def pixels(latents: torch.Tensor) -> torch.Tensor:
        return ((latents + 1) / 2).clamp(0, 1)

    def labelled(samples: torch.Tensor) -> float:
        with torch.no_grad():
            return float((classifier(pixel_values=samples).logits.argmax(-1) == labels).float().mean())

    dense = pixels(dynasparse.sample(model, noise, steps=steps, conditioning=conditioning, progress=False).latents)
    rows = [["dense model", "-", "-", f"{labelled(dense):.0%}", "64 tokens"]]
    chosen = {}
    for name, config in ROWS.items():
        config = _fidelity_config(config)
        optimized = dynasparse.optimize(model, [config], example_kwargs=example,
                                        calibration=calibration if _calibrates(config) else None)
        if _calibrates(config):
            chosen[name] = dataclasses.replace(ROWS[name], timestep_schedule=_chosen_schedule(optimized))
        run = dynasparse.sample(optimized, noise, steps=steps, conditioning=conditioning, progress=False)
        ours = pixels(run.latents)
        mse = float(F.mse_loss(ours, dense))
        rows.append([name, f"{10 * math.log10(1 / mse):.1f}" if mse else "inf", f"{mse:.5f}", f"{labelled(ours):.0%}",
                     _kept(optimized, run if isinstance(config, TokenCacheConfig) else None)])
    header = ["model", "PSNR vs dense (dB)", "MSE vs dense", "labelled as their class", "tokens kept"]
    title = (f"Digits DiT trained here (4 blocks, d=96, 8x8 images, 64 tokens), 100 samples (10 per class), DDIM "
             f"{steps} steps from the same noise as the dense model; labels by the digits ViT")
    markdown = f"# {title}\n\n" + table(header, rows, markdown=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "diffusion_fidelity.json").write_text(json.dumps(
        {"title": title, "header": header, "rows": rows,
         "calibrated": {name: list(c.timestep_schedule) for name, c in chosen.items()}}, indent=2) + "\n")
    (OUT / "diffusion_fidelity.md").write_text(markdown)
    return markdown, chosen


def speed_part(steps: int, batch: int, repeats: int, chosen: dict[str, TokenMergeConfig],
               only: list[str] | None = None) -> str:
    """``chosen``: the calibrated rows' schedules as the fidelity part chose them (rows without one are left
    out). ``only``: those rows beside the dense model (written beside the full table)."""
    model = dit_s2()
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(batch, 4, 64, 64, generator=generator)
    conditioning = {"class_labels": torch.arange(batch) % 1000}
    example = {"hidden_states": noise, "timestep": torch.full((batch,), 500), **conditioning}
    runners = {"dense model": model}
    notes = {"dense model": "1024 tokens"}
    for name, config in ROWS.items():
        config = chosen.get(name, config)
        if _calibrates(config) or (only and name not in only):
            continue
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
            if isinstance(ROWS.get(name), TokenCacheConfig):
                notes[name] = _kept(runner, run)
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
    name = "diffusion_speed_subset" if only else "diffusion_speed"
    (OUT / f"{name}.json").write_text(json.dumps(
        {"title": title, "header": header, "rows": rows, "seconds": seconds}, indent=2) + "\n")
    markdown = f"# {title}\n\n" + table(header, rows, markdown=True)
    (OUT / f"{name}.md").write_text(markdown)
    return markdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fidelity-steps", type=int, default=50)
    parser.add_argument("--parts", nargs="+", choices=("fidelity", "speed"), default=("fidelity", "speed"))
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=None,
                        help="the speed part times only these rows beside the dense model")
    args = parser.parse_args()
    chosen = {}
    if "fidelity" in args.parts:
        markdown, chosen = fidelity_part(args.fidelity_steps)
        print(markdown)
    if "speed" in args.parts:
        print(speed_part(args.steps, args.batch, args.repeats, chosen, args.rows))


if __name__ == "__main__":
    main()
