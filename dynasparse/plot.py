"""A dependency-free PNG scatter/line plot (stdlib zlib), for ``dynasparse demo --plot``.

dynasparse deliberately depends on no plotting library; this draws axes, tick labels (a 3x5 pixel font)
and one polyline with markers per series, which is all a speed-vs-fidelity curve needs.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

_FONT = {  # 3x5 glyphs, rows top to bottom, 3 bits each
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7), "4": (5, 5, 7, 1, 1),
    "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 1, 1), "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7),
    ".": (0, 0, 0, 0, 2), "x": (0, 5, 2, 5, 0), "-": (0, 0, 7, 0, 0),
}
_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


class _Canvas:
    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self.pixels = bytearray([255] * width * height * 3)

    def dot(self, x: int, y: int, color, radius: int = 0) -> None:
        for dy in range(-radius, radius + 1):
            for dx in range(-radius, radius + 1):
                px, py = x + dx, y + dy
                if 0 <= px < self.width and 0 <= py < self.height:
                    i = (py * self.width + px) * 3
                    self.pixels[i:i + 3] = bytes(color)

    def line(self, x0: int, y0: int, x1: int, y1: int, color) -> None:
        steps = max(abs(x1 - x0), abs(y1 - y0), 1)
        for step in range(steps + 1):
            self.dot(round(x0 + (x1 - x0) * step / steps), round(y0 + (y1 - y0) * step / steps), color)

    def text(self, x: int, y: int, text: str, scale: int = 2) -> None:
        for char in text:
            for row, bits in enumerate(_FONT.get(char, (0,) * 5)):
                for col in range(3):
                    if bits >> (2 - col) & 1:
                        for s in range(scale * scale):
                            self.dot(x + col * scale + s % scale, y + row * scale + s // scale, (0, 0, 0))
            x += 4 * scale

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.pixels[y * self.width * 3:(y + 1) * self.width * 3])
                       for y in range(self.height))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(
            b"IEND", b"")


def line_plot(path: str | Path, series: dict[str, list[tuple[float, float]]], *, width: int = 640,
              height: int = 420) -> Path:
    """Write the series (x, y points) as a PNG; the legend order is the colour order of ``_COLORS``."""
    canvas = _Canvas(width, height)
    left, right, top, bottom = 70, width - 20, 20, height - 50
    xs = [x for points in series.values() for x, _ in points]
    ys = [y for points in series.values() for _, y in points]
    x_lo, x_hi = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y_lo, y_hi = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    pad_x, pad_y = (x_hi - x_lo) * 0.05, (y_hi - y_lo) * 0.05
    x_lo, x_hi, y_lo, y_hi = x_lo - pad_x, x_hi + pad_x, y_lo - pad_y, y_hi + pad_y

    def to_px(x: float, y: float) -> tuple[int, int]:
        return (round(left + (x - x_lo) / (x_hi - x_lo) * (right - left)),
                round(bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top)))

    canvas.line(left, bottom, right, bottom, (0, 0, 0))
    canvas.line(left, top, left, bottom, (0, 0, 0))
    for i in range(5):
        x_value, y_value = x_lo + (x_hi - x_lo) * i / 4, y_lo + (y_hi - y_lo) * i / 4
        px, _ = to_px(x_value, y_lo)
        _, py = to_px(x_lo, y_value)
        canvas.line(px, bottom, px, bottom + 5, (0, 0, 0))
        canvas.text(px - 20, bottom + 10, f"{x_value:.2f}x")
        canvas.line(left - 5, py, left, py, (0, 0, 0))
        canvas.text(5, py - 5, f"{y_value:.3f}")
    for color, points in zip(_COLORS, series.values()):
        pixels = [to_px(x, y) for x, y in sorted(points)]
        for (x0, y0), (x1, y1) in zip(pixels, pixels[1:]):
            canvas.line(x0, y0, x1, y1, color)
        for x, y in pixels:
            canvas.dot(x, y, color, radius=3)
    path = Path(path)
    path.write_bytes(canvas.png())
    return path
