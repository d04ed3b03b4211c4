"""Dependency-free SVG charts: a run's curves and a workflow's evals as pictures that any browser opens.

Layer 6 (report): imports io, engine.logging and report.html.
"""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any, Sequence

from posttrain.engine.logging import read_metrics
from posttrain.io import atomic_write_text
from posttrain.report.html import EM_DASH, number

Series = Sequence[tuple[float, float]]
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def _ticks(lo: float, hi: float) -> list[float]:
    return [lo + (hi - lo) * k / 4 for k in range(5)]


def tick_labels(ticks: Sequence[float]) -> list[str]:
    """3 significant digits, or as many more (up to 5, what fits left of a panel) as it takes for neighbouring
    ticks to read differently: a loss between 10.38 and 10.50 gets 10.38 ... 10.5, not 10.4 three times."""
    for digits in range(3, 6):
        labels = [f"{t:.{digits}g}" for t in ticks]
        if len(set(labels)) == len(labels):
            return labels
    return labels


def panels_svg(title: str, panels: dict[str, dict[str, Series]], width: int = 640, panel_height: int = 170,
               x_ticks: Sequence[tuple[float, str]] | None = None) -> str:
    """One panel per entry (shared x range), each with one or more named series; empty series are skipped.
    ``x_ticks`` ((x, label) pairs) replaces the five even ticks, e.g. N = 1, 4, 16 on a log axis."""
    panels = {name: {k: list(v) for k, v in series.items() if v} for name, series in panels.items()}
    panels = {name: series for name, series in panels.items() if series}
    xs = [x for series in panels.values() for pts in series.values() for x, _ in pts]
    if not xs:
        raise ValueError(f"{title}: nothing to plot")
    x0, x1 = min(xs), max(xs)
    x1 = x1 if x1 > x0 else x0 + 1
    # The legend sits in a column right of the panels, so it never covers a curve's latest points.
    labels = [label for series in panels.values() for label in series]
    legend = min(240, 12 + 6 * max(len(label) for label in labels))
    left, top, gap = 64, 36, 46
    right = legend + 8
    width += legend
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
        for t, tick in zip(_ticks(lo, hi), tick_labels(_ticks(lo, hi))):
            out.append(f'<text x="{left - 4}" y="{py(t) + 4:.1f}" text-anchor="end">{tick}</text>')
        for t, tick in x_ticks or list(zip(_ticks(x0, x1), tick_labels(_ticks(x0, x1)))):
            out.append(f'<text x="{px(t):.1f}" y="{y_top + panel_height + 14}" text-anchor="middle">'
                       f'{escape(tick)}</text>')
        for j, (label, pts) in enumerate(series.items()):
            colour = COLOURS[j % len(COLOURS)]
            path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
            out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.6"/>')
            if len(pts) < 40:
                out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.2" fill="{colour}"/>' for x, y in pts]
            out.append(f'<text x="{width - right + 8}" y="{y_top + 10 + 13 * j}" fill="{colour}">'
                       f'{escape(_clipped(label, legend))}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _clipped(label: str, legend: int) -> str:
    """A legend label cut to the legend column (~6 px a character), with an ellipsis when cut."""
    room = max(4, (legend - 12) // 6)
    return label if len(label) <= room else label[:room - 1] + "\u2026"


def _label_lines(label: str, width: int = 16) -> list[str]:
    """A long metric name on two lines, broken after its last slash (names are like suite/metric)."""
    if len(label) <= width or "/" not in label:
        return [label]
    head, _, tail = label.rpartition("/")
    return [head + "/", tail]


def compact(v: float) -> str:
    """A bar's value label, short enough to sit on the bar: 3 significant digits, thousands as k and millions as M
    instead of an exponent (1250 -> 1.25k, 0.000123 -> 0.000123)."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}"


def eval_bars_svg(evals: dict[str, Any], width_per_bar: int = 22, height: int = 200) -> str:
    """A grouped bar chart, one group per metric and one bar per column. Each metric is scaled by its own largest
    magnitude (metrics have different units); the numbers are written on the bars."""
    columns, rows = list(evals.get("columns") or []), dict(evals.get("rows") or {})
    hib = evals.get("higher_is_better") or {}
    if not columns or not rows:
        return ""
    values = {m: {c: number(cells.get(c)) for c in columns} for m, cells in rows.items()}
    negative = any(v is not None and v < 0 for cells in values.values() for v in cells.values())
    left, top = 16, 62
    up = height / 2 if negative else height  # room above and below the zero line
    zero = top + up
    arrows = {True: " \u2191", False: " \u2193"}
    labels = {m: _label_lines(str(m) + arrows.get(hib.get(m), "")) for m in values}
    texts = {m: {c: compact(v) for c, v in cells.items() if v is not None} for m, cells in values.items()}
    # Each bar is as wide as its group's widest value label (9 px text, about 5.4 px a character), so neighbouring
    # labels never run into each other.
    pitch = {m: max(width_per_bar, 5.4 * max(map(len, texts[m].values()), default=0) + 6) for m in values}
    groups = [max(len(columns) * pitch[m], 6.6 * max(map(len, labels[m]))) + 18 for m in values]
    width = int(max(left * 2 + sum(groups), left + 110 * len(columns), 420))
    total_h = int(zero + (height - up) + 40)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{total_h}" '
           f'viewBox="0 0 {width} {total_h}" font-family="sans-serif" font-size="10">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{left}" y="18" font-size="14">held-out evals by stage</text>',
           f'<text x="{left}" y="33" fill="#666">each metric scaled to its largest value; '
           '\u2191 higher is better, \u2193 lower</text>']
    for j, c in enumerate(columns):
        x = left + 110 * j
        out.append(f'<rect x="{x}" y="40" width="12" height="12" fill="{COLOURS[j % len(COLOURS)]}"/>'
                   f'<text x="{x + 16}" y="50" font-size="12">{escape(str(c))}</text>')
    out.append(f'<line x1="{left}" y1="{zero}" x2="{width - left}" y2="{zero}" stroke="#888"/>')
    x_group = float(left)
    for (metric, cells), group_w in zip(values.items(), groups):
        bar = pitch[metric]
        x0 = x_group + (group_w - len(columns) * bar) / 2
        scale = max((abs(v) for v in cells.values() if v is not None), default=0.0) or 1.0
        for j, c in enumerate(columns):
            x, v = x0 + j * bar, cells[c]
            mid = x + (bar - 3) / 2
            if v is None:
                out.append(f'<text x="{mid:.1f}" y="{zero - 4}" text-anchor="middle">{EM_DASH}</text>')
                continue
            h = abs(v) / scale * (up - 14)
            y = zero - h if v >= 0 else zero
            out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar - 3:.1f}" height="{max(h, 0.5):.1f}" '
                       f'fill="{COLOURS[j % len(COLOURS)]}"><title>{escape(f"{metric} {c}: {v:.4g}")}</title></rect>')
            out.append(f'<text x="{mid:.1f}" y="{y - 3 if v >= 0 else y + h + 10:.1f}" text-anchor="middle" '
                       f'font-size="9">{texts[metric][c]}</text>')
        for k, line in enumerate(labels[metric]):
            out.append(f'<text x="{x_group + group_w / 2:.1f}" y="{zero + (height - up) + 14 + 13 * k:.1f}" '
                       f'text-anchor="middle" font-size="11">{escape(line)}</text>')
        x_group += group_w
    out.append("</svg>")
    return "\n".join(out)


def write_watch_plot(out: Path, title: str) -> Path | None:
    """rewards.svg: the trained reward per step and held-out, next to the watch terms when configured; each total
    with its terms (``reward/<term>``, ``watch/<term>``, held-out ``eval/...``), so a learned proxy's curve lies
    beside the outcome it stands for. A total of one term is that term, drawn once under the term's name."""
    recs = read_metrics(out / "metrics.jsonl")
    curve = lambda key: [(r["step"], r[key]) for r in recs if key in r]  # noqa: E731

    def with_terms(total: str) -> dict[str, Series]:
        terms = sorted({k for r in recs for k in r if k.startswith(total + "/")})
        if len(terms) == 1 and curve(terms[0]) == curve(total):
            return {terms[0]: curve(total)}
        return {total: curve(total), **{k: curve(k) for k in terms}}

    panels = {"reward (trained on), rollouts": with_terms("reward"),
              "watch (never trained on), rollouts": with_terms("watch"),
              "held-out, greedy": {**with_terms("eval/reward"), **with_terms("eval/watch")}}
    try:
        svg = panels_svg(title, panels)
    except ValueError:
        return None
    atomic_write_text(out / "rewards.svg", svg)
    return out / "rewards.svg"


def write_online_plot(out: Path, title: str, held_key: str) -> Path | None:
    """rewards.svg of an online DPO run: the scores of each round's samples (all, the chosen, the rejected: what it
    trains on) beside the held-out metric ``held_key`` and the watch terms (never trained on), so a score that
    climbs while the held-out one does not is seen at once."""
    recs = read_metrics(out / "metrics.jsonl")
    curve = lambda key: [(r["step"], r[key]) for r in recs if key in r]  # noqa: E731
    watch = sorted({k for r in recs for k in r if k.startswith("eval/watch")})
    panels = {"samples' scores per round (trained on)": {k: curve(f"online/{k}") for k in
                                                          ("sample_score", "chosen_score", "rejected_score")},
              "held-out, greedy": {held_key: curve(held_key), **{k: curve(k) for k in watch}},
              "pairs per round: kept and dropped": {k: curve(f"online/{k}") for k in
                                                    ("kept", "tie", "inconsistent", "intransitive")}}
    panels = {name: {k: pts for k, pts in series.items() if pts} for name, series in panels.items()}
    try:
        svg = panels_svg(title, {name: series for name, series in panels.items() if series})
    except ValueError:
        return None
    atomic_write_text(out / "rewards.svg", svg)
    return out / "rewards.svg"
