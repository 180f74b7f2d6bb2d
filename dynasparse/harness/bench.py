"""Shared runner for capability benchmarks: time a baseline against candidates.

Every case is timed interleaved in one run (round-robin, with the order rotated
each repeat) rather than one case after another. Sequential runs let slow
drift -- thermal throttling, CPU frequency changes, background load -- land on
one case and masquerade as a speedup or slowdown; interleaving spreads that
drift evenly over all cases. Medians are reported because they are robust to
the occasional outlier (a GC pause, a context switch) that would skew a mean.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from dynasparse.table import table

RESULTS_DIR = Path("benchmarks") / "results"  # relative to where benchmarks run: the repo root
_MIB = 1024 * 1024


@dataclass
class Case:
    """A named zero-argument callable that runs one forward pass (or one whole job).

    ``quality`` holds caller-computed accuracy metrics (e.g. max abs error vs.
    the baseline) so they are reported next to the timings they trade against.
    When ``fn`` returns a dict of numbers (e.g. a generation's prefill seconds
    and decode tokens/s), their medians over the repeats are the row's
    ``metrics``.
    """

    name: str
    fn: Callable[[], Any]
    quality: dict[str, float] = field(default_factory=dict)


@dataclass
class Row:
    """Measured result for one case; ``speedup`` is baseline median / this median."""

    name: str
    median_s: float
    min_s: float
    samples: list[float]
    speedup: float
    peak_mib: float | None
    quality: dict[str, float]
    metrics: dict[str, float] = field(default_factory=dict)


def _cuda_in_use() -> bool:
    # Only sync / read CUDA stats once the workload has initialised CUDA; a CPU
    # benchmark on a GPU machine must not pay for creating a CUDA context.
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _timed_call(fn: Callable[[], Any], cuda: bool) -> tuple[float, Any]:
    # Synchronise on both sides so queued asynchronous kernels are charged to
    # the call that launched them, not to whichever case runs next.
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    value = fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, value


@contextlib.contextmanager
def _native_stderr_silenced():
    """The profiler's native library writes "USDT ... profiler_start/stop" lines straight to file
    descriptor 2 on every start and stop; point it at /dev/null for those two moments only."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak CPU bytes allocated above the start of one call of ``fn``.

    The CPU allocator keeps no peak counter, so replay the profiler's memory
    records ("[memory]" events: positive nbytes = allocation, negative = free)
    in time order and take the maximum of the running sum.
    """
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _native_stderr_silenced():
        prof.start()
    try:
        fn()
    finally:
        with _native_stderr_silenced():
            prof.stop()
    events = sorted(
        (
            e
            for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
        ),
        key=lambda e: e.start_ns(),
    )
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def _peak_mib(fn: Callable[[], Any], cuda: bool) -> float:
    """Peak memory in MiB above the starting level during one untimed call."""
    if not cuda:
        return _cpu_peak_bytes(fn) / _MIB
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return max(torch.cuda.max_memory_allocated() - start, 0) / _MIB


def compare(
    baseline: Case,
    candidates: list[Case],
    *,
    warmup: int = 2,
    repeats: int = 7,
    measure_memory: bool = True,
) -> list[Row]:
    """Time ``baseline`` and ``candidates`` interleaved; return one Row each, baseline first.

    Each repeat runs every case once, rotating the order so no case is always
    first (the first slot tends to pay for cold caches left by the previous
    case). Memory is measured on a separate untimed call so profiling overhead
    never pollutes the timings.
    """
    cases = [baseline, *candidates]
    samples: dict[int, list[float]] = {i: [] for i in range(len(cases))}
    returned: dict[int, list[dict]] = {i: [] for i in range(len(cases))}
    with torch.inference_mode():
        for case in cases:
            for _ in range(warmup):
                case.fn()
        cuda = _cuda_in_use()
        for r in range(repeats):
            shift = r % len(cases)
            for i in [*range(shift, len(cases)), *range(shift)]:
                elapsed, value = _timed_call(cases[i].fn, cuda)
                samples[i].append(elapsed)
                if isinstance(value, dict) and all(isinstance(x, (int, float)) for x in value.values()):
                    returned[i].append(value)  # a job's own numbers; a model's output dict is not a metric
        peaks = [_peak_mib(c.fn, cuda) if measure_memory else None for c in cases]

    base_median = statistics.median(samples[0])
    rows = []
    for i, case in enumerate(cases):
        median = statistics.median(samples[i])
        rows.append(
            Row(
                name=case.name,
                median_s=median,
                min_s=min(samples[i]),
                samples=samples[i],
                speedup=1.0 if i == 0 else base_median / median,
                peak_mib=peaks[i],
                quality=dict(case.quality),
                metrics={k: statistics.median(v[k] for v in returned[i]) for k in (returned[i] or [{}])[0]},
            )
        )
    return rows


def format_table(rows: list[Row]) -> str:
    """Markdown table: case | median ms | speedup | peak MiB | one column per metric, then per quality key
    (peak MiB is left out when no row measured it)."""
    metric_keys = list(dict.fromkeys(k for row in rows for k in row.metrics))
    quality_keys = list(dict.fromkeys(k for row in rows for k in row.quality))
    peaks = any(row.peak_mib is not None for row in rows)
    header = ["case", "median ms", "speedup", *(["peak MiB"] if peaks else []), *metric_keys, *quality_keys]
    body = [[row.name, f"{row.median_s * 1e3:.3f}", f"{row.speedup:.2f}x",
             *(["-" if row.peak_mib is None else f"{row.peak_mib:.1f}"] if peaks else []),
             *(f"{row.metrics[k]:.4g}" if k in row.metrics else "-" for k in metric_keys),
             *(f"{row.quality[k]:.4g}" if k in row.quality else "-" for k in quality_keys)] for row in rows]
    return table(header, body, markdown=True)


class _FirstLogitsClock:
    """A Hugging Face logits processor that notes when ``generate`` has the prompt's logits (the end of
    its prefill); every later call is one decode step."""

    def __init__(self):
        self.first: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.first is None:
            self.first = time.perf_counter()
        return scores


def hf_generate_timed(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      max_new_tokens: int, **kwargs: Any) -> tuple[torch.Tensor, dict[str, float]]:
    """Hugging Face's greedy ``generate`` as a user calls it, timed the way ``dynasparse.generate`` reports:
    (new tokens [B, N], {"prefill ms", "decode tok/s" per row, "cache MiB" of its KV cache})."""
    from transformers import LogitsProcessorList

    clock = _FirstLogitsClock()
    start = time.perf_counter()
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                         do_sample=False, logits_processor=LogitsProcessorList([clock]), **kwargs)
    end = time.perf_counter()
    new = out[:, input_ids.shape[1]:]
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = next(model.parameters()).element_size()
    cache = (2 * config.num_hidden_layers * input_ids.shape[0] * config.num_key_value_heads * out.shape[1]
             * head_dim * element)
    decode = (new.shape[1] - 1) / (end - clock.first) if new.shape[1] > 1 else 0.0
    return new, {"prefill ms": (clock.first - start) * 1e3, "decode tok/s": decode, "cache MiB": cache / _MIB}


def write_results(
    title: str,
    rows: list[Row],
    *,
    name: str,
    meta: dict | None = None,
    out_dir: Path = RESULTS_DIR,
) -> str:
    """Write ``<name>.json`` and ``<name>.md`` under ``out_dir``; return the markdown.

    The environment (torch version, thread count, machine) is recorded with
    the numbers because timings are meaningless without it.
    """
    full_meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cuda_device": torch.cuda.get_device_name() if _cuda_in_use() else None,
        **(meta or {}),
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"title": title, "meta": full_meta, "rows": [asdict(r) for r in rows]}
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    meta_lines = "".join(f"- {k}: {v}\n" for k, v in full_meta.items())
    markdown = f"# {title}\n\n{meta_lines}\n{format_table(rows)}"
    (out_dir / f"{name}.md").write_text(markdown)
    return markdown
