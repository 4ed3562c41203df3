"""Small inline-SVG charts for the offline report (no JavaScript library, no CDN)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from html import escape

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
W, H, PAD = 560, 320, 48


def _scale(lo: float, hi: float, a: float, b: float):
    span = (hi - lo) or 1.0
    return lambda v: a + (v - lo) / span * (b - a)


def _bounds(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if v == v and abs(v) != float("inf")]
    if not finite:
        return 0.0, 1.0
    lo, hi = min(finite), max(finite)
    return (lo - 0.5, hi + 0.5) if lo == hi else (lo, hi)


def nice_ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> tuple[float, float, list[float]]:
    """Axis bounds widened to round numbers and 3-`n`+1 ticks at 1, 2 or 5 x 10^k steps between
    them; `integer` (layers, steps) never ticks between whole numbers."""
    span = hi - lo
    raw = span / max(1, n - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    if integer:  # up to 13 whole numbers: tick each; else a whole-number step
        step = 1.0 if span <= 12 else max(1.0, float(math.ceil(step)))
    a, b = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    if integer and lo == math.floor(lo) and hi == math.ceil(hi):
        a, b = min(a, lo), max(b, hi)
    ticks = [a + i * step for i in range(int(round((b - a) / step)) + 1)]
    return a, b, [0.0 if abs(t) < step * 1e-9 else t for t in ticks]


def tick_label(v: float) -> str:
    return f"{v:.4g}"


def chart(series: dict[str, tuple[Sequence[float], Sequence[float]]], title: str, xlabel: str,
          ylabel: str, mark: str = "line", chart_id: str = "",
          labels: dict[str, Sequence[str]] | None = None) -> str:
    """Lines or scatter points, one color per series, with axes, ticks and a legend. The data
    itself rides along as JSON in `data-series` (name -> [xs, ys]) for readers and tests.
    `labels`: per series, a text beside each point (scatter)."""
    xs = [x for sx, _ in series.values() for x in sx]
    ys = [y for _, sy in series.values() for y in sy]
    integer_x = bool(xs) and all(float(x).is_integer() for x in xs)  # layers, steps
    if integer_x and len(set(xs)) == 1:  # one layer: a unit-wide axis around it, ticked at the layer
        x0, x1, xt = xs[0] - 1, xs[0] + 1, [xs[0] - 1, xs[0], xs[0] + 1]
    else:
        x0, x1, xt = nice_ticks(*_bounds(xs), integer=integer_x)
    y0, y1, yt = nice_ticks(*_bounds(ys))
    fx, fy = _scale(x0, x1, PAD, W - 12), _scale(y0, y1, H - PAD, 24)
    data = escape(json.dumps({name: [[float(x) for x in sx], [float(y) for y in sy]]
                              for name, (sx, sy) in series.items()}), quote=True)
    out = [f'<svg class="chart" id="{escape(chart_id)}" data-series="{data}" viewBox="0 0 {W} {H}" '
           f'width="{W}" height="{H}" xmlns="http://www.w3.org/2000/svg" role="img"><title>{escape(title)}</title>',
           f'<text x="{W / 2}" y="14" text-anchor="middle" class="t">{escape(title)}</text>',
           f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - 12}" y2="{H - PAD}" stroke="#444"/>',
           f'<line x1="{PAD}" y1="24" x2="{PAD}" y2="{H - PAD}" stroke="#444"/>']
    for xv in xt:
        out.append(f'<text x="{fx(xv):.1f}" y="{H - PAD + 14}" text-anchor="middle" class="k tx">'
                   f"{tick_label(xv)}</text>")
    for yv in yt:
        out.append(f'<text x="{PAD - 4}" y="{fy(yv) + 4:.1f}" text-anchor="end" class="k ty">{tick_label(yv)}</text>')
    out.append(f'<text x="{W / 2}" y="{H - 8}" text-anchor="middle" class="k">{escape(xlabel)}</text>')
    out.append(f'<text x="12" y="{H / 2}" transform="rotate(-90 12 {H / 2})" text-anchor="middle" '
               f'class="k">{escape(ylabel)}</text>')
    for i, (name, (sx, sy)) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        pts = [(fx(x), fy(y)) for x, y in zip(sx, sy, strict=True) if y == y]
        if mark == "line" and len(pts) > 1:
            d = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{d}"/>')
        else:
            out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{color}" fill-opacity="0.6"/>'
                    for x, y in pts]
            names = (labels or {}).get(name)
            if names:
                kept = [lab for lab, y in zip(names, sy, strict=True) if y == y]
                out += [f'<text x="{x + 4:.1f}" y="{y - 4:.1f}" class="k point-label">{escape(str(lab))}</text>'
                        for (x, y), lab in zip(pts, kept, strict=True)]
        out.append(f'<text x="{W - 16}" y="{30 + 14 * i}" text-anchor="end" style="fill:{color}" '
                   f'class="legend" data-color="{color}">{escape(name)}</text>')  # style: no CSS rule wins
    out.append("</svg>")
    return "".join(out)
