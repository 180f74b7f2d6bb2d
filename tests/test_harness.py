"""Structural tests for the benchmark harness (no wall-time assertions)."""

import json
import time
from pathlib import Path

import torch

from dynasparse.harness.bench import Case, Row, compare, format_table, write_results


def _sleep(seconds: float):
    return lambda: time.sleep(seconds)


def test_compare_structure() -> None:
    baseline = Case("slow", _sleep(0.002))
    fast = Case("fast", _sleep(0.001), quality={"max_abs_err": 0.0})
    rows = compare(baseline, [fast], warmup=1, repeats=5, measure_memory=False)

    assert [r.name for r in rows] == ["slow", "fast"]
    assert rows[0].speedup == 1.0
    assert rows[1].speedup > 0
    for row in rows:
        assert isinstance(row, Row)
        assert len(row.samples) == 5
        assert row.median_s > 0
        assert 0 < row.min_s <= row.median_s
        assert row.peak_mib is None
    assert rows[1].quality == {"max_abs_err": 0.0}


def test_compare_interleaves_and_rotates_order() -> None:
    calls: list[str] = []
    cases = [Case(n, lambda n=n: calls.append(n)) for n in "abc"]
    compare(cases[0], cases[1:], warmup=0, repeats=3, measure_memory=False)
    assert calls == list("abc" "bca" "cab")


def test_only_a_dict_of_numbers_is_a_metric() -> None:
    """A job may report its own numbers; a model's output (a dict of tensors) is not one of them."""
    job = Case("job", lambda: {"prefill_s": 0.5})
    forward = Case("forward", lambda: {"last_hidden_state": torch.zeros(2)})
    rows = compare(job, [forward], warmup=0, repeats=2, measure_memory=False)
    assert rows[0].metrics == {"prefill_s": 0.5}
    assert rows[1].metrics == {}


def test_peak_memory_tracks_allocation() -> None:
    def allocate() -> float:
        t = torch.ones(16 * 1024 * 1024)  # 64 MiB of float32
        return float(t[0])

    rows = compare(
        Case("noop", lambda: None), [Case("alloc", allocate)], warmup=1, repeats=1
    )
    noop, alloc = rows
    assert noop.peak_mib is not None and alloc.peak_mib is not None
    assert alloc.peak_mib >= 32
    assert alloc.peak_mib > noop.peak_mib


def test_write_results(tmp_path: Path) -> None:
    rows = compare(
        Case("base", lambda: None),
        [Case("cand", lambda: None, quality={"rel_err": 1e-3})],
        warmup=0,
        repeats=2,
        measure_memory=False,
    )
    md = write_results("Demo", rows, name="demo", meta={"model": "tiny"}, out_dir=tmp_path)

    assert (tmp_path / "demo.md").read_text() == md
    assert "base" in md and "cand" in md and "rel_err" in md
    assert format_table(rows) in md
    data = json.loads((tmp_path / "demo.json").read_text())
    assert data["title"] == "Demo"
    assert data["meta"]["model"] == "tiny"
    assert data["meta"]["torch"] == torch.__version__
    assert "threads" in data["meta"] and "machine" in data["meta"]
    assert [r["name"] for r in data["rows"]] == ["base", "cand"]
