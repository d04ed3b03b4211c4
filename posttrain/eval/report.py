"""report.html: one self-contained page per run (curves, before/after evals, config, samples) and per workflow.

Inline SVG and CSS only, no script and no external URL, so the page opens from disk, from a copied folder or from
a CI artifact with nothing else around it.
"""

from __future__ import annotations

import json
import math
import os
import re
from html import escape
from pathlib import Path
from typing import Any, Callable, Iterable

from posttrain.engine.logging import read_metrics
from posttrain.engine.plot import COLOURS, panels_svg
from posttrain.io import atomic_write_text

EM_DASH = "\u2014"

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 960px;
       color: #222; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }
h3 { font-size: 15px; margin-top: 20px; }
.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 4px 8px; vertical-align: top; }
th { background: #f4f4f4; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.better { background: #d9f2d9; } td.worse { background: #f8d7d7; }
td.text { white-space: pre-wrap; max-width: 300px; } td.text div { max-height: 180px; overflow: auto; }
pre { background: #f7f7f7; border: 1px solid #ddd; padding: 10px; font-size: 12px; overflow: auto; }
.badge { display: inline-block; padding: 2px 10px; border-radius: 4px; color: white; font-weight: bold; }
.pass { background: #2e7d32; } .blocked { background: #c62828; }
td.blocked { color: #c62828; background: #f8d7d7; font-weight: bold; }
.ran { color: #2e7d32; } .cached { color: #1565c0; } .failed, .fail { color: #c62828; font-weight: bold; }
.skipped { color: #888; } .ok { color: #2e7d32; }
pre.wrap { white-space: pre-wrap; }
.note { color: #666; font-size: 12px; }
figure { margin: 12px 0; } figure svg[viewBox] { max-width: 100%; height: auto; }
"""

# Each figure: (title, [(panel title, [metric keys or key predicates])]); a panel or a figure with no key present
# is left out, so one table serves every method.
Matcher = Callable[[str], bool]
_Spec = list[tuple[str, list[tuple[str, list[str | Matcher]]]]]


def _prefix(p: str) -> Matcher:
    return lambda k: k.startswith(p)


FIGURES: _Spec = [
    ("loss and learning rate", [
        ("loss", ["loss", "eval/loss"]),
        ("policy and value loss", ["policy_loss", "value_loss"]),
        ("held-out perplexity", ["eval/ppl"]),
        ("learning rate", ["lr"]),
    ]),
    ("rewards and margins", [
        ("chosen and rejected rewards", ["rewards/chosen", "rewards/rejected", "eval/rewards/chosen",
                                         "eval/rewards/rejected"]),
        ("reward margin", ["rewards/margin", "eval/rewards/margin"]),
        ("chosen and rejected scores", ["score/chosen", "score/rejected", "eval/score_chosen", "eval/score_rejected"]),
        ("score margin", ["score/margin"]),
        ("held-out score spread", ["eval/score_p90", "eval/score_mean", "eval/score_p10"]),
        ("held-out score against response length (correlation)", ["eval/length_corr"]),
        ("accuracy", ["accuracy", "eval/accuracy"]),
        ("log-probs", ["logps/chosen", "logps/rejected", "eval/logps/chosen", "eval/logps/rejected"]),
    ]),
    ("KL", []),  # one panel per KL quantity, its training and held-out curves together: see _kl_panels
    ("reward curves", [
        ("reward (trained on)", ["reward", "eval/reward", "score_shaped"]),
        ("reward terms", [lambda k: bool(re.fullmatch(r"(eval/)?reward/.+", k))]),
        ("watch (never trained on)", ["watch", "eval/watch", _prefix("watch/"), _prefix("eval/watch/")]),
        ("critic: value and return", ["value_mean", "return_mean", _prefix("critic/")]),
        ("KL penalty in the reward", ["non_score_reward"]),
        ("reward spread in a group", ["reward_std"]),
        ("completion length", ["completion_len", "eval/completion_len"]),
        ("clipped and truncated fraction", ["clip_fraction", "truncated"]),
    ]),
    ("optimisation and throughput", [
        ("gradient norm", ["grad_norm"]),
        ("tokens per second", ["tokens_per_s"]),
    ]),
]


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _kl_panels(keys: list[str]) -> list[tuple[str, list[str | Matcher]]]:
    names = dict.fromkeys(k.removeprefix("eval/") for k in keys if "kl" in k.lower())
    return [(name, [name, f"eval/{name}"]) for name in names]


def _keys_for(matchers: list[str | Matcher], keys: list[str]) -> list[str]:
    out: list[str] = []
    for m in matchers:
        found = [m] if isinstance(m, str) and m in keys else \
            sorted((k for k in keys if not isinstance(m, str) and m(k)), key=lambda k: k.startswith("eval/"))
        out += [k for k in found if k not in out]
    return out


def run_figures(records: list[dict[str, Any]], title: str = "") -> tuple[list[str], list[str]]:
    """The SVG figures of a run's metrics records, and the numeric keys no panel shows."""
    keys = [k for r in records for k, v in r.items() if k != "step" and _number(v) is not None]
    keys = list(dict.fromkeys(keys))
    shown: set[str] = set()
    figures = []
    for fig_title, panel_specs in FIGURES:
        panels: dict[str, dict[str, list[tuple[float, float]]]] = {}
        for panel_title, matchers in panel_specs or _kl_panels(keys):
            series: dict[str, list[tuple[float, float]]] = {}
            for k in _keys_for(matchers, keys):
                pts = [(float(r["step"]), float(r[k])) for r in records if "step" in r and _number(r.get(k)) is not None]
                same = next((label for label, other in series.items() if other == pts), None)
                if same:  # e.g. watch and its only term watch/x: one line, both names
                    series[f"{same} = {k}"] = series.pop(same)
                elif pts and len(series) < len(COLOURS):  # more lines than colours would be unreadable
                    series[k] = pts
                else:
                    continue
                shown.add(k)
            if series:
                panels[panel_title] = series
        if panels:
            figures.append(panels_svg(f"{title}: {fig_title}" if title else fig_title, panels))
    return figures, [k for k in keys if k not in shown]


def _fmt(v: Any, signed: bool = False) -> str:
    if v is None:
        return EM_DASH
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:+,d}" if signed else f"{v:,d}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:+.4g}" if signed else f"{v:.4g}"
    return escape(str(v))


def _seconds(s: float | None) -> str:
    if s is None:
        return EM_DASH
    return f"{s:.1f} s" if s < 60 else f"{int(s // 60)} min {s % 60:02.0f} s"


def _better(key: str) -> bool | None:
    """A guess of a run metric's direction, only to colour the change column; unknown stays uncoloured."""
    name = key.removeprefix("eval/")
    if re.search(r"(^|/|_)(loss|ppl)$", name):
        return False
    if re.search(r"accuracy|margin|^reward($|/)|^watch|exact", name):
        return True
    return None


def _cell_class(value: Any, base: Any, higher_is_better: bool | None) -> str:
    v, b = _number(value), _number(base)
    if higher_is_better is None or v is None or b is None or v == b:
        return "num"
    return "num better" if (v > b) == higher_is_better else "num worse"


def _table(head: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    """Cells are escaped HTML; a cell that needs a class comes as its own ``<td ...>`` element."""
    out = ["<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for row in rows:
        out.append("<tr>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in row) + "</tr>")
    return "\n".join(out) + "</table>"


def _page(title: str, body: list[str]) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _method(config_text: str) -> str:
    m = re.search(r"^method:\s*(\S+)", config_text, re.M)
    return m.group(1) if m else "run"


def _curves_html(run_dir: Path, title: str) -> str:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return f'<p class="note">no metrics.jsonl in {escape(str(run_dir))}</p>'
    figures, rest = run_figures(read_metrics(metrics), title)
    html = "\n".join(f"<figure>{svg}</figure>" for svg in figures) or '<p class="note">no metric to plot</p>'
    if rest:
        html += f'<p class="note">also logged, not plotted: {escape(", ".join(rest))}</p>'
    return html


def _before_after(summary: dict[str, Any]) -> str:
    before, after = summary.get("eval_before") or {}, summary.get("eval_after") or {}
    metrics = [k for k in dict.fromkeys([*before, *after]) if k != "step"]
    if not metrics:
        return '<p class="note">no held-out evaluation in summary.json</p>'
    rows = []
    for k in metrics:
        b, a = before.get(k), after.get(k)
        change = a - b if _number(a) is not None and _number(b) is not None else None
        rows.append([escape(k), f'<td class="num">{_fmt(b)}</td>', f'<td class="num">{_fmt(a)}</td>',
                     f'<td class="{_cell_class(a, b, _better(k))}">{_fmt(change, signed=True)}</td>'])
    head = ["metric", f"before (step {_fmt(before.get('step'))})", f"after (step {_fmt(after.get('step'))})", "change"]
    return _table(head, rows)


def _samples(run_dir: Path) -> str:
    path = run_dir / "samples.jsonl"
    if not path.exists():
        return ""
    rows = read_metrics(path)
    cols = list(dict.fromkeys(k for r in rows for k in r)) or ["prompt", "reference", "output"]
    body = [[f'<td class="text"><div>{escape(str(r.get(c, "")))}</div></td>' for c in cols] for r in rows]
    return "<h2>samples (held-out, greedy)</h2>\n" + _table(map(escape, cols), body)


def run_report_html(run_dir: Path) -> str:
    """The report page of one run folder (metrics.jsonl, summary.json, config.yaml, samples.jsonl if present)."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    config_text = config_path.read_text() if config_path.exists() else ""
    method = _method(config_text)
    name = run_dir.resolve().name
    summary = _read_json(run_dir / "summary.json")
    facts = [(k, _seconds(summary[k]) if k == "seconds" else _fmt(summary[k]))
             for k in ("steps", "seconds", "trainable", "total_params", "final_loss", "output")
             if summary.get(k) is not None]
    body = [f"<h1>{escape(name)} \u00b7 {escape(method.upper())}</h1>",
            f'<p class="sub">{escape(str(run_dir))}</p>']
    if facts:
        body.append(_table(["summary", ""], [[escape(k), f'<td class="num">{v}</td>'] for k, v in facts]))
    if summary.get("data"):
        body.append('<pre class="wrap">' + escape("\n".join(map(str, summary["data"]))) + "</pre>")
    body += ["<h2>held-out evaluation, before and after</h2>", _before_after(summary),
             "<h2>curves</h2>", _curves_html(run_dir, name), _samples(run_dir)]
    if config_text:
        body += ["<h2>config.yaml</h2>", f"<pre>{escape(config_text)}</pre>"]
    return _page(f"{name} \u00b7 {method}", body)


def write_run_report(run_dir: Path) -> Path:
    path = Path(run_dir) / "report.html"
    atomic_write_text(path, run_report_html(Path(run_dir)))
    return path


def _label_lines(label: str, width: int = 16) -> list[str]:
    """A long metric name on two lines, broken after its last slash (names are like suite/metric)."""
    if len(label) <= width or "/" not in label:
        return [label]
    head, _, tail = label.rpartition("/")
    return [head + "/", tail]


def eval_bars_svg(evals: dict[str, Any], width_per_bar: int = 22, height: int = 200) -> str:
    """A grouped bar chart, one group per metric and one bar per column. Each metric is scaled by its own largest
    magnitude (metrics have different units); the numbers are written on the bars."""
    columns, rows = list(evals.get("columns") or []), dict(evals.get("rows") or {})
    hib = evals.get("higher_is_better") or {}
    if not columns or not rows:
        return ""
    values = {m: {c: _number(cells.get(c)) for c in columns} for m, cells in rows.items()}
    negative = any(v is not None and v < 0 for cells in values.values() for v in cells.values())
    left, top = 16, 62
    up = height / 2 if negative else height  # room above and below the zero line
    zero = top + up
    arrows = {True: " \u2191", False: " \u2193"}
    labels = {m: _label_lines(str(m) + arrows.get(hib.get(m), "")) for m in values}
    groups = [max(len(columns) * width_per_bar, 6.6 * max(map(len, labels[m]))) + 18 for m in values]
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
        x0 = x_group + (group_w - len(columns) * width_per_bar) / 2
        scale = max((abs(v) for v in cells.values() if v is not None), default=0.0) or 1.0
        for j, c in enumerate(columns):
            x, v = x0 + j * width_per_bar, cells[c]
            mid = x + (width_per_bar - 3) / 2
            if v is None:
                out.append(f'<text x="{mid:.1f}" y="{zero - 4}" text-anchor="middle">{EM_DASH}</text>')
                continue
            h = abs(v) / scale * (up - 14)
            y = zero - h if v >= 0 else zero
            out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{width_per_bar - 3}" height="{max(h, 0.5):.1f}" '
                       f'fill="{COLOURS[j % len(COLOURS)]}"><title>{escape(f"{metric} {c}: {v:.4g}")}</title></rect>')
            out.append(f'<text x="{mid:.1f}" y="{y - 3 if v >= 0 else y + h + 10:.1f}" text-anchor="middle" '
                       f'font-size="9">{v:.3g}</text>')
        for k, line in enumerate(labels[metric]):
            out.append(f'<text x="{x_group + group_w / 2:.1f}" y="{zero + (height - up) + 14 + 13 * k:.1f}" '
                       f'text-anchor="middle" font-size="11">{escape(line)}</text>')
        x_group += group_w
    out.append("</svg>")
    return "\n".join(out)


def _eval_table(evals: dict[str, Any]) -> str:
    columns, rows = list(evals.get("columns") or []), dict(evals.get("rows") or {})
    hib = evals.get("higher_is_better") or {}
    if not columns or not rows:
        return '<p class="note">no evaluation</p>'
    body = []
    for metric, cells in rows.items():
        direction = {True: "higher", False: "lower"}.get(hib.get(metric), "?")
        row = [escape(str(metric)), escape(direction)]
        first = cells.get(columns[0])
        for j, c in enumerate(columns):
            v = cells.get(c)
            cls = _cell_class(v, first, hib.get(metric)) if j else "num"
            diff = v - first if j and _number(v) is not None and _number(first) is not None else None
            extra = f' <span class="note">({_fmt(diff, signed=True)})</span>' if diff is not None else ""
            row.append(f'<td class="{cls}">{_fmt(v)}{extra}</td>')
        body.append(row)
    return _table(["metric", "better", *(escape(str(c)) for c in columns)], body)


def _gate_html(gate: dict[str, Any]) -> str:
    passed = bool(gate.get("passed"))
    badge = '<span class="badge pass">PASS</span>' if passed else '<span class="badge blocked">BLOCKED</span>'
    checks = gate.get("checks") or []
    notes = any(ch.get("note") for ch in checks)
    rows = []
    for ch in checks:
        ok = bool(ch.get("passed"))
        row = [escape(str(ch.get("metric", ""))), f'<td class="num">{_fmt(ch.get("baseline"))}</td>',
               f'<td class="num">{_fmt(ch.get("candidate"))}</td>',
               f'<td class="num">{_fmt(ch.get("change"), signed=True)}</td>', escape(str(ch.get("rule", ""))),
               f'<td class="{"ok" if ok else "fail"}">{"pass" if ok else "FAIL"}</td>']
        if notes:
            row.append(escape(str(ch.get("note") or "")))
        rows.append(row)
    head = ["metric", escape(str(gate.get("baseline", "baseline"))), escape(str(gate.get("candidate", "candidate"))),
            "change", "rule", "result", *(["note"] if notes else [])]
    return (f"<h3>{badge} {escape(str(gate.get('name', 'gate')))}: {escape(str(gate.get('candidate', '')))} vs "
            f"{escape(str(gate.get('baseline', '')))}</h3>\n" + _table(head, rows))


def workflow_report_html(*, title: str, stages: list[dict[str, Any]], evals: dict[str, Any], gates: list[dict[str, Any]],
                         runs: dict[str, Path], config_text: str, report_dir: Path = Path(".")) -> str:
    """The report page of a workflow; ``report_dir`` is where the page will live, for relative links to the runs."""
    body = [f"<h1>{escape(title)} \u00b7 workflow</h1>"]
    if gates:
        blocked = [str(g.get("name")) for g in gates if not g.get("passed")]
        body.append('<p><span class="badge blocked">BLOCKED</span> at ' + escape(", ".join(blocked)) + "</p>" if blocked
                    else '<p><span class="badge pass">PASS</span> every gate passed</p>')
    body.append("<h2>stages</h2>")
    body.append(_table(["stage", "status", "time", "detail"],
                       [[escape(str(s.get("name", ""))),
                         f'<td class="{escape(str(s.get("status", "")))}">{escape(str(s.get("status", "")))}</td>',
                         f'<td class="num">{_seconds(s.get("seconds"))}</td>',
                         f'<td class="text">{escape(str(s.get("detail") or ""))}</td>'] for s in stages])
                if stages else '<p class="note">no stage</p>')
    body += ["<h2>evaluation by stage</h2>", _eval_table(evals)]
    bars = eval_bars_svg(evals)
    if bars:
        body.append(f"<figure>{bars}</figure>")
    body.append("<h2>gates</h2>")
    body += [_gate_html(g) for g in gates] or ['<p class="note">no gate</p>']
    if runs:
        body.append("<h2>training runs</h2>")
    for name, run_dir in runs.items():
        run_dir = Path(run_dir)
        report = run_dir / "report.html"
        if not report.exists() and (run_dir / "metrics.jsonl").exists():
            write_run_report(run_dir)  # so the link below never points at nothing
        link = os.path.relpath(report.resolve(), Path(report_dir).resolve())
        body.append(f'<h3>{escape(str(name))} <span class="note">(<a href="{escape(link)}">{escape(link)}</a>)</span></h3>')
        body.append(_curves_html(run_dir, str(name)))
    body += ["<h2>workflow config</h2>", f"<pre>{escape(config_text)}</pre>"]
    return _page(f"{title} \u00b7 workflow", body)


def write_workflow_report(path: Path, *, title: str, stages: list[dict[str, Any]], evals: dict[str, Any],
                          gates: list[dict[str, Any]], runs: dict[str, Path], config_text: str) -> Path:
    path = Path(path)
    atomic_write_text(path, workflow_report_html(title=title, stages=stages, evals=evals, gates=gates, runs=runs,
                                                 config_text=config_text, report_dir=path.parent))
    return path
