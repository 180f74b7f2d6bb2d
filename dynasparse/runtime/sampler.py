"""DDIM sampling over a diffusion transformer (the original or an optimized one), step by step with stats.

Speed and fidelity of a token-density schedule only mean something over a whole generation: the
schedule keeps more tokens at noisy steps and fewer late, and errors of early steps carry to the end.
``sample`` runs the denoising loop the way diffusers' pipelines do (DDIM, deterministic with ``eta=0``),
calls the model with the latents, the step's timestep for every row, and the conditioning, and records
each step's time and, for a model with a timestep schedule, the share of tokens its band keeps. Over a
model optimized with ``TokenCacheConfig`` it keeps the caches across steps and picks each step's tokens
(``runtime/token_cache.py``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from dynasparse.errors import DynasparseError
from dynasparse.plans import TIMESTEP_BANDS
from dynasparse.runtime.delayed_kv import DelayedKVModel
from dynasparse.runtime.token_cache import ActiveTokens


@dataclass
class SamplingStats:
    timesteps: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # the model call of each step
    keep: list[float] = field(default_factory=list)  # per step: the band's keep ratio, or the share of tokens
    #                                                  computed over a token cache (1.0 otherwise)

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds)


@dataclass
class Sampled:
    latents: torch.Tensor
    stats: SamplingStats


def _band_keep(model: Any, timestep: float) -> float:
    """The keep ratio of the band a step runs (``TokenMergeConfig.timestep_schedule``), else 1.0."""
    graph_module = getattr(model, "graph_module", None)
    bands = graph_module.meta.get(TIMESTEP_BANDS) if graph_module is not None else None
    if bands is None:
        return 1.0
    return bands.keep_at(timestep)


def _noise_prediction(output: Any, channels: int) -> torch.Tensor:
    sample = output.sample if hasattr(output, "sample") else output[0] if isinstance(output, (tuple, list)) else output
    if sample.shape[1] == 2 * channels:  # DiT's learned sigma: the first half is the noise
        return sample[:, :channels]
    return sample


def sample(model: Any, noise: torch.Tensor, *, steps: int = 50, scheduler: Any = None,
           conditioning: dict[str, torch.Tensor] | None = None, timestep_input: str = "timestep",
           progress: bool = True) -> Sampled:
    """Denoise ``noise`` [B, C, H, W] in ``steps`` DDIM steps with ``model``; ``conditioning``: the other
    model inputs (``class_labels``, ``encoder_hidden_states``, ...). ``scheduler``: any diffusers scheduler
    (default: DDIM over 1000 training steps, as DiT was trained)."""
    if noise.dim() != 4:
        raise DynasparseError(f"noise has shape {tuple(noise.shape)}; give latents [batch, channels, height, width]")
    if steps < 1:
        raise DynasparseError(f"steps={steps}: sample at least one step")
    if scheduler is None:
        try:
            from diffusers import DDIMScheduler
        except ImportError:
            raise DynasparseError("sampling needs diffusers' schedulers: pip install 'dynasparse[diffusion]'") from None
        scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    latents = noise * scheduler.init_noise_sigma
    stats = SamplingStats()

    def inputs(t: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"hidden_states": latents, timestep_input: t.expand(noise.shape[0]), **(conditioning or {})}

    cache = _token_cache(model)
    if cache is not None:
        length = cache.length_of(**inputs(scheduler.timesteps[0]))
        active = ActiveTokens(cache.plan.config, len(scheduler.timesteps), length)
        cache.start(noise.shape[0], length, noise.device)
    try:
        with torch.no_grad():
            for step, t in enumerate(tqdm(scheduler.timesteps, desc="denoising", disable=not progress)):
                if cache is not None:
                    cache.active = active.choose(step)
                start = time.perf_counter()
                output = model(**inputs(t))
                stats.seconds.append(time.perf_counter() - start)
                stats.timesteps.append(int(t))
                prediction = _noise_prediction(output, noise.shape[1])
                if cache is not None:
                    stats.keep.append(1.0 if cache.active is None else cache.active.shape[1] / length)
                    active.observe(prediction)
                else:
                    stats.keep.append(_band_keep(model, float(t)))
                latents = scheduler.step(prediction, t, latents).prev_sample
    finally:
        if cache is not None:
            cache.stop()
    return Sampled(latents, stats)


def _token_cache(model: Any) -> DelayedKVModel | None:
    """The caches of a model optimized with ``TokenCacheConfig`` (None for any other model)."""
    runner = getattr(model, "runner", None)
    if not isinstance(runner, DelayedKVModel):
        return None
    if runner.plan.stream_cache is None:
        raise DynasparseError(f"this model runs its blocks on active tokens for {type(runner.plan.config).__name__}"
                              ", a diffusion LM's cache: decode it with dynasparse.unmask; for a diffusion "
                              "transformer use TokenCacheConfig")
    return runner
