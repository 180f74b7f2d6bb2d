"""The one table formatter: aligned text for reports and the CLI, Markdown for benchmark results."""
from __future__ import annotations

from typing import Any, Sequence


def table(header: Sequence[Any], rows: Sequence[Sequence[Any]], markdown: bool = False) -> str:
    """``header`` and ``rows`` as a table; Markdown right-aligns every column after the first."""
    if markdown:
        lines = ["| " + " | ".join(map(str, header)) + " |", "|---|" + "---:|" * (len(header) - 1)]
        return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows]) + "\n"
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])
