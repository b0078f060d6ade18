"""Inline SVG charts: line charts of metrics over steps, and a histogram.

Written by hand rather than with a plotting library: a report is opened anywhere, often offline
and long after the run, so it must not fetch a script from a CDN, and a charting dependency
(matplotlib, plotly: tens of MB, and plotly's page is megabytes of JavaScript) would be heavier
than all of qdpo for a few polylines. Plain SVG needs no script at all: hover tooltips are
`<title>` elements, and the page can forbid scripts outright (see page.py).

Every string that reaches the markup passes through `esc`; numbers are formatted here.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field

W, H = 480, 270  # the viewBox; the page scales the charts to its column width
LEFT, RIGHT, TOP, BOTTOM = 62, 24, 30, 38  # room for tick labels
MAX_POINTS = 800  # per polyline: beyond this, min/max per bucket keeps spikes and the shape
MAX_MARKERS = 100  # hover targets per series
Points = list[tuple[float, float]]


def esc(text: object) -> str:
    """Text or attribute value, safe inside HTML and inline SVG (quotes included)."""
    return html.escape(str(text), quote=True)


@dataclass
class Line:
    """One series of one chart: a run's train (solid) or eval (dashed, marked) values."""

    label: str
    color: str
    points: Points = field(default_factory=list)
    dashed: bool = False


def decimate(points: Points, limit: int = MAX_POINTS) -> Points:
    """At most about `limit` points: for each bucket of consecutive points, its lowest and
    highest (in step order), so a loss spike survives where every-k-th sampling drops it."""
    if len(points) <= limit:
        return points
    size = math.ceil(len(points) / (limit // 2))
    out: Points = []
    for i in range(0, len(points), size):
        bucket = points[i:i + size]
        lo, hi = min(bucket, key=lambda p: p[1]), max(bucket, key=lambda p: p[1])
        out.extend(sorted({lo, hi}))
    if out[-1] != points[-1]:
        out.append(points[-1])  # the last value is the one a reader looks for
    return out


def nice_ticks(lo: float, hi: float, count: int = 5, integer: bool = False) -> list[float]:
    """Round tick values (1, 2, 5 times a power of ten) covering [lo, hi]; whole numbers only
    when `integer` (no step 2.5)."""
    span = hi - lo
    raw = span / max(1, count)
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    step = max(1, round(step)) if integer else step
    first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
    return [k * step for k in range(first, min(last, first + 3 * count) + 1)]


def _span(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):  # a constant series: give it some room
        pad = abs(hi) * 0.05 or 1.0
        return lo - pad, hi + pad
    pad = (hi - lo) * 0.04
    return lo - pad, hi + pad


def fmt_num(v: float) -> str:
    """A tick label: whole numbers in full (steps: 20,000, not 2e+04), small ones with the
    digits that tell neighbouring ticks apart (1.05e-05 beside 1e-05)."""
    if v == 0:
        return "0"
    if float(v).is_integer() and abs(v) < 1e7:
        return f"{int(v):,}"
    return f"{v:.3g}" if abs(v) < 1e-3 else f"{v:.4g}"


class Frame:
    """The plot area of one chart: maps data to pixels and draws the axes."""

    def __init__(self, xs: tuple[float, float], ys: tuple[float, float],
                 integer_x: bool = False):
        self.x0, self.x1 = xs
        self.y0, self.y1 = ys
        self.integer_x = integer_x

    def x(self, v: float) -> float:
        return LEFT + (v - self.x0) / (self.x1 - self.x0) * (W - LEFT - RIGHT)

    def y(self, v: float) -> float:
        return H - BOTTOM - (v - self.y0) / (self.y1 - self.y0) * (H - TOP - BOTTOM)

    def axes(self, title: str, x_label: str) -> list[str]:
        parts = [f'<text class="title" x="{LEFT}" y="18">{esc(title)}</text>',
                 f'<rect class="plot" x="{LEFT}" y="{TOP}" width="{W - LEFT - RIGHT}" '
                 f'height="{H - TOP - BOTTOM}"/>']
        for t in nice_ticks(self.y0, self.y1):
            y = self.y(t)
            parts.append(f'<line class="grid" x1="{LEFT}" x2="{W - RIGHT}" y1="{y:.1f}" '
                         f'y2="{y:.1f}"/><text class="tick" x="{LEFT - 5}" y="{y + 3.5:.1f}" '
                         f'text-anchor="end">{fmt_num(t)}</text>')
        for t in nice_ticks(self.x0, self.x1, 6, self.integer_x):
            x = self.x(t)
            parts.append(f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" '
                         f'y2="{H - BOTTOM}"/><text class="tick" x="{x:.1f}" '
                         f'y="{H - BOTTOM + 14}" text-anchor="middle">{fmt_num(t)}</text>')
        parts.append(f'<text class="axis" x="{(LEFT + W - RIGHT) / 2:.0f}" y="{H - 6}" '
                     f'text-anchor="middle">{esc(x_label)}</text>')
        return parts


def _svg(parts: list[str], cls: str, title: str, attrs: str) -> str:
    return (f'<svg class="{cls}" viewBox="0 0 {W} {H}" role="img" aria-label="{esc(title)}" '
            f'{attrs}>' + "".join(parts) + "</svg>")


def line_chart(title: str, lines: list[Line], x_label: str = "step") -> str:
    """Lines overlaid on shared axes; each point a hover target whose tooltip names the run,
    the step and the value (eval points always drawn, train points on hover only)."""
    lines = [ln for ln in lines if ln.points]
    xs = [p[0] for ln in lines for p in ln.points]
    ys = [p[1] for ln in lines for p in ln.points]
    frame = Frame(_span(xs) if len(set(xs)) < 2 else (min(xs), max(xs)), _span(ys),
                  integer_x=all(float(x).is_integer() for x in xs))
    parts = frame.axes(title, x_label)
    total = 0
    for ln in lines:
        pts = decimate(ln.points)
        total += len(pts)
        coords = " ".join(f"{frame.x(x):.1f},{frame.y(y):.1f}" for x, y in pts)
        dash = ' stroke-dasharray="5 3"' if ln.dashed else ""
        parts.append(f'<polyline class="series" points="{coords}" stroke="{ln.color}"{dash}>'
                     f'<title>{esc(ln.label)}</title></polyline>')
        every = max(1, math.ceil(len(pts) / MAX_MARKERS))
        marked = pts[::every] + ([pts[-1]] if (len(pts) - 1) % every else [])
        cls = "pt eval" if ln.dashed else "pt"
        for x, y in marked:
            parts.append(f'<circle class="{cls}" cx="{frame.x(x):.1f}" cy="{frame.y(y):.1f}" '
                         f'r="3" fill="{ln.color}"><title>{esc(ln.label)}\n{esc(x_label)} '
                         f'{x:g}: {y:.6g}</title></circle>')
    return _svg(parts, "chart", title, f'data-series="{len(lines)}" data-points="{total}"')


def histogram(title: str, groups: list[tuple[str, str, list[float]]], x_label: str,
              marker: float | None = 0.0) -> str:
    """Counts of values in shared bins, one bar per group in each bin (side by side, so
    several runs stay readable), and a dashed line at `marker` (for margins: where the
    chosen and rejected rewards are equal)."""
    groups = [g for g in groups if g[2]]
    values = [v for g in groups for v in g[2]]
    lo, hi = min(values), max(values)
    if marker is not None:  # always in view: the side of it a value falls on is the point
        lo, hi = min(lo, marker), max(hi, marker)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    bins = max(5, min(40, math.ceil(math.sqrt(max(len(g[2]) for g in groups)) * 1.5)))
    width = (hi - lo) / bins
    counts = [[0] * bins for _ in groups]
    for c, (_, _, vals) in zip(counts, groups):
        for v in vals:
            c[min(bins - 1, int((v - lo) / width))] += 1
    frame = Frame((lo, hi), (0.0, max(max(c) for c in counts) * 1.08))
    parts = frame.axes(title, x_label)
    bar = (frame.x(lo + width) - frame.x(lo)) / len(groups)
    total = 0
    for g, ((label, color, vals), c) in enumerate(zip(groups, counts)):
        for b, n in enumerate(c):
            if not n:
                continue
            total += 1
            x, top = frame.x(lo + b * width) + g * bar, frame.y(n)
            parts.append(f'<rect class="bar" x="{x:.1f}" y="{top:.1f}" width="{bar:.1f}" '
                         f'height="{frame.y(0) - top:.1f}" fill="{color}"><title>{esc(label)}: '
                         f'{n} of {len(vals)} pairs with {esc(x_label)} in '
                         f'[{lo + b * width:.4g}, {lo + (b + 1) * width:.4g})</title></rect>')
    if marker is not None:
        x = frame.x(marker)
        parts.append(f'<line class="marker" x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" '
                     f'y2="{H - BOTTOM}"><title>{esc(x_label)} = {marker:g}</title></line>')
    return _svg(parts, "chart hist", title, f'data-series="{len(groups)}" data-points="{total}"')
