"""Line charts as standalone SVG, without a plotting library (none is a dependency): ``mqc diagnose --plot`` draws
SQNR by layer with it, ``benchmarks/bench_scale.py --svg`` time and memory against depth.

A chart is a column of :class:`Panel` s sharing one width; each panel has its own axes, ticks and legend. Points
whose y is None break the line (a layer without that modality). Only what a reader needs: lines, markers,
dashed what-if series, tick labels; every coordinate is computed here and can be read back from the SVG
(``data-label`` names each series' polyline).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from xml.sax.saxutils import escape

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 64, 16, 34, 46


@dataclass
class Series:
    """One line: ``points`` (x, y or None), drawn dashed for what-if figures; ``color`` indexes the palette."""

    label: str
    points: Sequence[tuple[float, float | None]]
    color: int = 0
    dashed: bool = False


@dataclass
class Panel:
    title: str
    x_label: str
    y_label: str
    series: list[Series] = field(default_factory=list)
    #: Labelled x positions (e.g. decoder layer numbers); default: evenly spaced numeric ticks.
    x_ticks: Sequence[tuple[float, str]] | None = None


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values (steps of 1, 2 or 5 times a power of ten) covering [low, high]."""
    if not high > low:
        low, high = low - 1.0, high + 1.0
    raw = (high - low) / max(count, 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 10))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 10))
    return ticks


def _label(value: float) -> str:
    return f"{value:g}"


class _Axes:
    """Maps data coordinates to the pixels of one panel."""

    def __init__(self, panel: Panel, top: float, width: int, height: int) -> None:
        xs = [x for s in panel.series for x, y in s.points if y is not None]
        ys = [y for s in panel.series for _, y in s.points if y is not None]
        if panel.x_ticks:
            xs += [x for x, _ in panel.x_ticks]
        self.x_ticks = list(panel.x_ticks) if panel.x_ticks else [(t, _label(t)) for t in nice_ticks(min(xs), max(xs))]
        self.y_ticks = nice_ticks(min(ys), max(ys))
        self.x0, self.x1 = min(xs + [t for t, _ in self.x_ticks]), max(xs + [t for t, _ in self.x_ticks])
        self.y0, self.y1 = self.y_ticks[0], self.y_ticks[-1]
        self.left, self.right = MARGIN_LEFT, width - MARGIN_RIGHT
        self.top, self.bottom = top + MARGIN_TOP, top + height - MARGIN_BOTTOM

    def px(self, x: float) -> float:
        span = (self.x1 - self.x0) or 1.0
        return round(self.left + (x - self.x0) / span * (self.right - self.left), 2)

    def py(self, y: float) -> float:
        span = (self.y1 - self.y0) or 1.0
        return round(self.bottom - (y - self.y0) / span * (self.bottom - self.top), 2)


def _runs(points: Sequence[tuple[float, float | None]]) -> list[list[tuple[float, float]]]:
    """The series split where y is None."""
    runs: list[list[tuple[float, float]]] = [[]]
    for x, y in points:
        if y is None:
            if runs[-1]:
                runs.append([])
        else:
            runs[-1].append((x, y))
    return [run for run in runs if run]


def _panel_svg(panel: Panel, top: float, width: int, height: int) -> list[str]:
    if not any(y is not None for s in panel.series for _, y in s.points):
        return [f'<text x="{MARGIN_LEFT}" y="{top + MARGIN_TOP}" font-size="13">{escape(panel.title)}: no data</text>']
    axes = _Axes(panel, top, width, height)
    out = [f'<text x="{MARGIN_LEFT}" y="{top + 20}" font-size="14" font-weight="bold">{escape(panel.title)}</text>',
           f'<rect x="{axes.left}" y="{axes.top}" width="{axes.right - axes.left}" '
           f'height="{axes.bottom - axes.top}" fill="none" stroke="#444"/>']
    for value in axes.y_ticks:
        y = axes.py(value)
        out.append(f'<line x1="{axes.left}" y1="{y}" x2="{axes.right}" y2="{y}" stroke="#ddd"/>')
        out.append(f'<text x="{axes.left - 6}" y="{y + 4}" font-size="11" text-anchor="end">{_label(value)}</text>')
    for value, text in axes.x_ticks:
        x = axes.px(value)
        out.append(f'<line x1="{x}" y1="{axes.bottom}" x2="{x}" y2="{axes.bottom + 4}" stroke="#444"/>')
        out.append(f'<text x="{x}" y="{axes.bottom + 16}" font-size="11" text-anchor="middle">{escape(text)}</text>')
    out.append(f'<text x="{(axes.left + axes.right) / 2}" y="{axes.bottom + 36}" font-size="12" '
               f'text-anchor="middle">{escape(panel.x_label)}</text>')
    middle = (axes.top + axes.bottom) / 2
    out.append(f'<text x="16" y="{middle}" font-size="12" text-anchor="middle" '
               f'transform="rotate(-90 16 {middle})">{escape(panel.y_label)}</text>')
    for index, series in enumerate(panel.series):
        color = PALETTE[series.color % len(PALETTE)]
        dash = ' stroke-dasharray="5,3"' if series.dashed else ""
        for run in _runs(series.points):
            coords = " ".join(f"{axes.px(x)},{axes.py(y)}" for x, y in run)
            out.append(f'<polyline data-label="{escape(series.label)}" points="{coords}" fill="none" '
                       f'stroke="{color}" stroke-width="1.5"{dash}/>')
            if len(run) <= 60:
                out.extend(f'<circle cx="{axes.px(x)}" cy="{axes.py(y)}" r="2.5" fill="{color}"/>' for x, y in run)
        legend_y = axes.top + 14 + 15 * index
        out.append(f'<line x1="{axes.right - 170}" y1="{legend_y - 4}" x2="{axes.right - 146}" y2="{legend_y - 4}" '
                   f'stroke="{color}" stroke-width="2"{dash}/>')
        out.append(f'<text x="{axes.right - 140}" y="{legend_y}" font-size="11">{escape(series.label)}</text>')
    return out


def render_svg(panels: Sequence[Panel], width: int = 960, panel_height: int = 320) -> str:
    """The SVG document of ``panels`` stacked top to bottom."""
    height = panel_height * len(panels)
    body = [line for i, panel in enumerate(panels) for line in _panel_svg(panel, i * panel_height, width,
                                                                          panel_height)]
    return "\n".join([f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
                      f'viewBox="0 0 {width} {height}" font-family="sans-serif">',
                      f'<rect width="{width}" height="{height}" fill="white"/>', *body, "</svg>", ""])
