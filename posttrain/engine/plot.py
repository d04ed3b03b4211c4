"""Dependency-free SVG line charts: a run's curves as a picture that any browser opens."""

from __future__ import annotations

from html import escape
from typing import Sequence

Series = Sequence[tuple[float, float]]
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def _ticks(lo: float, hi: float) -> list[float]:
    return [lo + (hi - lo) * k / 4 for k in range(5)]


def panels_svg(title: str, panels: dict[str, dict[str, Series]], width: int = 640, panel_height: int = 170) -> str:
    """One panel per entry (shared x range), each with one or more named series; empty series are skipped."""
    panels = {name: {k: list(v) for k, v in series.items() if v} for name, series in panels.items()}
    panels = {name: series for name, series in panels.items() if series}
    xs = [x for series in panels.values() for pts in series.values() for x, _ in pts]
    if not xs:
        raise ValueError(f"{title}: nothing to plot")
    x0, x1 = min(xs), max(xs)
    x1 = x1 if x1 > x0 else x0 + 1
    left, right, top, gap = 64, 16, 36, 46
    height = top + len(panels) * (panel_height + gap)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="11"><rect width="100%" height="100%" fill="white"/>',
           f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">{escape(title)}</text>']
    for k, (name, series) in enumerate(panels.items()):
        y_top = top + k * (panel_height + gap) + 16
        ys = [y for pts in series.values() for _, y in pts]
        lo, hi = min(ys), max(ys)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        px = lambda x: left + (x - x0) / (x1 - x0) * (width - left - right)  # noqa: E731
        py = lambda y: y_top + (1 - (y - lo) / (hi - lo)) * panel_height  # noqa: E731
        out.append(f'<text x="{left}" y="{y_top - 6}" font-weight="bold">{escape(name)}</text>')
        out.append(f'<rect x="{left}" y="{y_top}" width="{width - left - right}" height="{panel_height}" '
                   'fill="none" stroke="#bbb"/>')
        for t in _ticks(lo, hi):
            out.append(f'<text x="{left - 4}" y="{py(t) + 4:.1f}" text-anchor="end">{t:.3g}</text>')
        for t in _ticks(x0, x1):
            out.append(f'<text x="{px(t):.1f}" y="{y_top + panel_height + 14}" text-anchor="middle">{t:.3g}</text>')
        for j, (label, pts) in enumerate(series.items()):
            colour = COLOURS[j % len(COLOURS)]
            path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
            out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.6"/>')
            if len(pts) < 40:
                out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.2" fill="{colour}"/>' for x, y in pts]
            out.append(f'<text x="{width - right - 4}" y="{y_top + 14 + 13 * j}" text-anchor="end" '
                       f'fill="{colour}">{escape(label)}</text>')
    out.append("</svg>")
    return "\n".join(out)
