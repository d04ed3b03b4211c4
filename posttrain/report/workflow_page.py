"""report.html of a workflow: stages, evals by stage, gates and the curves of every training run.

Layer 6 (report): imports io, report.html, report.svg, report.run_page and report.best_of_n.
"""

from __future__ import annotations

import os
from html import escape
from pathlib import Path
from typing import Any

from posttrain.io import atomic_write_text
from posttrain.report.best_of_n import best_of_n_html, without_best_of_n
from posttrain.report.html import cell_class, fmt, number, page, seconds, table
from posttrain.report.run_page import curves_html, write_run_report
from posttrain.report.svg import eval_bars_svg


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
            cls = cell_class(v, first, hib.get(metric)) if j else "num"
            diff = v - first if j and number(v) is not None and number(first) is not None else None
            extra = f' <span class="note">({fmt(diff, signed=True)})</span>' if diff is not None else ""
            row.append(f'<td class="{cls}">{fmt(v)}{extra}</td>')
        body.append(row)
    return table(["metric", "better", *(escape(str(c)) for c in columns)], body)


def _gate_html(gate: dict[str, Any]) -> str:
    passed = bool(gate.get("passed"))
    badge = '<span class="badge pass">PASS</span>' if passed else '<span class="badge blocked">BLOCKED</span>'
    checks = gate.get("checks") or []
    notes = any(ch.get("note") for ch in checks)
    rows = []
    for ch in checks:
        ok = bool(ch.get("passed"))
        row = [escape(str(ch.get("metric", ""))), f'<td class="num">{fmt(ch.get("baseline"))}</td>',
               f'<td class="num">{fmt(ch.get("candidate"))}</td>',
               f'<td class="num">{fmt(ch.get("change"), signed=True)}</td>', escape(str(ch.get("rule", ""))),
               f'<td class="{"ok" if ok else "fail"}">{"pass" if ok else "FAIL"}</td>']
        if notes:
            row.append(escape(str(ch.get("note") or "")))
        rows.append(row)
    head = ["metric", escape(str(gate.get("baseline", "baseline"))), escape(str(gate.get("candidate", "candidate"))),
            "change", "rule", "result", *(["note"] if notes else [])]
    return (f"<h3>{badge} {escape(str(gate.get('name', 'gate')))}: {escape(str(gate.get('candidate', '')))} vs "
            f"{escape(str(gate.get('baseline', '')))}</h3>\n" + table(head, rows))


def workflow_report_html(*, title: str, stages: list[dict[str, Any]], evals: dict[str, Any],
                         gates: list[dict[str, Any]], runs: dict[str, Path], config_text: str,
                         report_dir: Path = Path(".")) -> str:
    """The report page of a workflow; ``report_dir`` is where the page will live, for relative links to the runs."""
    body = [f"<h1>{escape(title)} \u00b7 workflow</h1>"]
    if gates:
        blocked = [str(g.get("name")) for g in gates if not g.get("passed")]
        body.append('<p><span class="badge blocked">BLOCKED</span> at ' + escape(", ".join(blocked)) + "</p>" if blocked
                    else '<p><span class="badge pass">PASS</span> every gate passed</p>')
    body.append("<h2>stages</h2>")
    body.append(table(["stage", "status", "time", "detail"],
                       [[escape(str(s.get("name", ""))),
                         f'<td class="{escape(str(s.get("status", "")))}">{escape(str(s.get("status", "")))}</td>',
                         f'<td class="num">{seconds(s.get("seconds"))}</td>',
                         f'<td class="text">{escape(str(s.get("detail") or ""))}</td>'] for s in stages])
                if stages else '<p class="note">no stage</p>')
    body += ["<h2>evaluation by stage</h2>", _eval_table(without_best_of_n(evals, keep_accuracy=True))]
    bars = eval_bars_svg(without_best_of_n(evals, keep_accuracy=False))
    if bars:
        body.append(f"<figure>{bars}</figure>")
    best_of_n = best_of_n_html(evals)
    if best_of_n:
        body.append(best_of_n)
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
        body.append(f'<h3>{escape(str(name))} <span class="note">(<a href="{escape(link)}">{escape(link)}</a>)'
                    '</span></h3>')
        body.append(curves_html(run_dir, str(name)))
    body += ["<h2>workflow config</h2>", f"<pre>{escape(config_text)}</pre>"]
    return page(f"{title} \u00b7 workflow", body)


def write_workflow_report(path: Path, *, title: str, stages: list[dict[str, Any]], evals: dict[str, Any],
                          gates: list[dict[str, Any]], runs: dict[str, Path], config_text: str) -> Path:
    path = Path(path)
    atomic_write_text(path, workflow_report_html(title=title, stages=stages, evals=evals, gates=gates, runs=runs,
                                                 config_text=config_text, report_dir=path.parent))
    return path
