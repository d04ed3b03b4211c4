"""The best-of-N section of a workflow's report: per suite and model, a table of selectors x N (accuracy and its
standard error) and a plot of accuracy against N, one line per selector.

A best_of_n suite (``posttrain.eval.best_of_n``) writes ``<selector>@<N>`` and ``<selector>@<N>_se``; a metric is
read as best-of-N only with its ``_se`` twin, so another suite's metric with an ``@`` in its name is left alone.

Layer 6 (report): imports report.html and report.svg.
"""

from __future__ import annotations

import math
import re
from html import escape
from typing import Any

from posttrain.report.html import fmt, number, table
from posttrain.report.svg import panels_svg

_METRIC = re.compile(r"^(?P<suite>.+)/(?P<selector>\w+)@(?P<n>\d+)$")

# suite -> model label -> selector -> N -> (accuracy, standard error)
Results = dict[str, dict[str, dict[str, dict[int, tuple[float, float]]]]]


def best_of_n_results(evals: dict[str, Any]) -> Results:
    """The best-of-N accuracies of a workflow's eval table (``{"columns", "rows", ...}``), by suite and model."""
    rows = dict(evals.get("rows") or {})
    out: Results = {}
    for metric, cells in rows.items():
        m = _METRIC.match(str(metric))
        if not m or f"{metric}_se" not in rows:
            continue
        for label in evals.get("columns") or []:
            acc, se = number(cells.get(label)), number(rows[f"{metric}_se"].get(label))
            if acc is not None and se is not None:
                by_n = out.setdefault(m["suite"], {}).setdefault(label, {}).setdefault(m["selector"], {})
                by_n[int(m["n"])] = (acc, se)
    return out


def is_best_of_n(metric: str, rows: dict[str, Any]) -> bool:
    """An accuracy (``suite/selector@N`` with its ``_se`` twin) or a standard error of a best_of_n suite."""
    if metric.endswith("_se") and metric[:-3] in rows:
        metric = metric[:-3]
    return bool(_METRIC.match(metric)) and f"{metric}_se" in rows


def without_best_of_n(evals: dict[str, Any], *, keep_accuracy: bool) -> dict[str, Any]:
    """The eval table without the best-of-N standard errors (shown as ± in this section's tables) and, unless
    ``keep_accuracy``, without the accuracies too (the bar chart would hold one bar group per selector and N)."""
    rows = dict(evals.get("rows") or {})
    kept = {m: cells for m, cells in rows.items()
            if not is_best_of_n(m, rows) or keep_accuracy and not m.endswith("_se")}
    return {**evals, "rows": kept}


def best_of_n_html(evals: dict[str, Any]) -> str:
    """The section (heading, tables, one figure per suite); empty when no suite is a best_of_n one."""
    results = best_of_n_results(evals)
    if not results:
        return ""
    body = ["<h2>best-of-N</h2>",
            '<p class="note">accuracy \u00b1 its binomial standard error; best-of-N reads the first N of the same '
            "samples. majority: the most frequent final answer, ties to the answer sampled first; oracle: pass@N, "
            "the ceiling; orm, prm_min and prm_vote run only when the suite names their model (options.orm, "
            "options.prm).</p>"]
    for suite, by_label in results.items():
        ns = sorted({n for by_sel in by_label.values() for by_n in by_sel.values() for n in by_n})
        panels = {}
        for label, by_sel in by_label.items():
            rows = [[escape(sel), *(f'<td class="num">{fmt(by_n[n][0])} \u00b1 {fmt(by_n[n][1])}</td>'
                                    if n in by_n else f'<td class="num">{fmt(None)}</td>' for n in ns)]
                    for sel, by_n in by_sel.items()]
            body.append(f"<h3>{escape(suite)} \u00b7 {escape(str(label))}</h3>")
            body.append(table(["selector", *(f"N={n}" for n in ns)], rows))
            panels[str(label)] = {sel: [(math.log2(n), by_n[n][0]) for n in sorted(by_n)]
                                  for sel, by_n in by_sel.items()}
        svg = panels_svg(f"{suite}: accuracy against N (log scale)", panels,
                         x_ticks=[(math.log2(n), str(n)) for n in ns])
        body.append(f"<figure>{svg}</figure>")
    return "\n".join(body)
