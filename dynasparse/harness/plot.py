"""Speed-against-quality curves with matplotlib (the optional extra ``dynasparse[plots]``)."""
from __future__ import annotations

from pathlib import Path

from dynasparse.errors import DynasparseError


def line_plot(path: str | Path, series: dict[str, list[tuple[float, float]]], *, xlabel: str = "speedup",
              ylabel: str = "quality", title: str | None = None) -> Path:
    """Write each series of (x, y) points as a line with markers to ``path`` (PNG, SVG or PDF by suffix)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        from matplotlib import pyplot as plt
    except ImportError as error:
        raise DynasparseError("plots need matplotlib: pip install 'dynasparse[plots]' (or pip install "
                              "matplotlib)") from error
    figure, axes = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    for name, points in series.items():
        xs, ys = zip(*sorted(points))
        axes.plot(xs, ys, marker="o", label=name)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    if title:
        axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
