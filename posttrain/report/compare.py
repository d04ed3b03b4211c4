"""compare.html: two or more run folders side by side, one line per run in each panel, the config keys in which
they differ, and a table of each metric's early and late means (the curves of one run alone are noisy; halves
are what a reader compares).

Layer 6 (report): imports io and report.html / report.svg.
"""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any

from posttrain.io import atomic_write_text, read_complete_jsonl, read_json
from posttrain.report.html import EM_DASH, fmt, number, page, seconds, table
from posttrain.report.svg import COLOURS, panels_svg

DEFAULT_PANELS = {"loss": "loss", "rollout reward": "reward", "held-out reward": "eval/reward",
                  "held-out loss": "eval/loss", "KL": "kl", "entropy": "entropy"}


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: value}


def config_differences(runs: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """{config key: {run: value}} for every key of config.yaml whose value is not the same in all runs (a key a
    run lacks counts as different); output_dir left out."""
    import yaml

    flat = {}
    for name, run in runs.items():
        path = Path(run) / "config.yaml"
        flat[name] = _flat(yaml.safe_load(path.read_text()) or {}) if path.exists() else {}
    keys = sorted({k for f in flat.values() for k in f} - {"output_dir"})
    return {k: {n: f.get(k, EM_DASH) for n, f in flat.items()} for k in keys
            if len({repr(f.get(k, EM_DASH)) for f in flat.values()}) > 1}


def _series(records: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    return [(float(r["step"]), float(r[key])) for r in records if "step" in r and number(r.get(key)) is not None]


def _halves(pts: list[tuple[float, float]]) -> tuple[float | None, float | None]:
    if not pts:
        return None, None
    if len(pts) == 1:
        return pts[0][1], pts[0][1]
    mid = len(pts) // 2
    first, second = [y for _, y in pts[:mid]], [y for _, y in pts[mid:]]
    return sum(first) / len(first), sum(second) / len(second)


def evals_table(runs: dict[str, Path]) -> str:
    """Each run's last held-out eval (summary.json's eval_after) side by side, one row per metric, with the change
    from its first (eval_before) beside it; empty when no run has one."""
    evals = {}
    for name, run in runs.items():
        summary = read_json(Path(run) / "summary.json")
        summary = summary if isinstance(summary, dict) else {}
        evals[name] = (summary.get("eval_before") or {}, summary.get("eval_after") or {})
    metrics = [k for k in dict.fromkeys(k for _, after in evals.values() for k in after) if k != "step"]
    if not metrics:
        return ""
    rows = []
    for k in metrics:
        cells = [escape(k)]
        for before, after in evals.values():
            a, b = number(after.get(k)), number(before.get(k))
            change = f" ({fmt(a - b, signed=True)})" if a is not None and b is not None else ""
            cells.append(f'<td class="num">{fmt(after.get(k))}{change}</td>')
        rows.append(cells)
    return table(["metric (after training, change from before)", *map(escape, runs)], rows)


def compare_html(runs: dict[str, Path], panels: dict[str, str] | None = None, title: str = "runs compared") -> str:
    """The comparison page of ``runs`` ({label: run folder}); ``panels`` maps a panel title to a metrics key."""
    return page(title, compare_body(runs, panels, title))


def compare_body(runs: dict[str, Path], panels: dict[str, str] | None = None,
                 title: str = "runs compared") -> list[str]:
    """The comparison's HTML elements (the page's body; posttrain ui shows them inside its own page)."""
    if len(runs) < 2:
        raise ValueError(f"a comparison needs at least 2 runs, got {len(runs)}")
    if len(runs) > len(COLOURS):
        raise ValueError(f"at most {len(COLOURS)} runs fit one comparison (one colour each), got {len(runs)}")
    records, missing = {}, []
    for name, run in runs.items():
        path = Path(run) / "metrics.jsonl"
        if path.exists():
            records[name] = read_complete_jsonl(path)  # a live run may be writing its last line
        else:
            missing.append(f"{name} ({path})")
    if missing:
        raise FileNotFoundError("no metrics.jsonl for " + ", ".join(missing))
    panels = panels or DEFAULT_PANELS
    series = {p: {name: _series(recs, key) for name, recs in records.items()} for p, key in panels.items()}
    series = {p: s for p, s in series.items() if any(s.values())}
    body = [f"<h1>{escape(title)}</h1>", '<p class="sub">' + escape(", ".join(f"{n}: {r}" for n, r in runs.items()))
            + "</p>"]
    facts = []
    for name, run in runs.items():
        summary = read_json(Path(run) / "summary.json") or {}
        facts.append([escape(name), f'<td class="num">{fmt(summary.get("steps"))}</td>',
                      f'<td class="num">{seconds(summary.get("seconds"))}</td>'])
    body.append(table(["run", "steps", "wall"], facts))
    held_out = evals_table(runs)
    if held_out:
        body += ["<h2>held-out evals</h2>", held_out]
    diffs = config_differences(runs)
    if diffs:
        body += ["<h2>what differs</h2>",
                 table(["config key", *map(escape, runs)],
                       [[escape(k), *(f"<td>{escape(str(v))}</td>" for v in values.values())]
                        for k, values in diffs.items()])]
    if series:
        body += ["<h2>curves</h2>", f"<figure>{panels_svg(title, series)}</figure>"]
        rows = []
        for p, per_run in series.items():
            for name, pts in per_run.items():
                early, late = _halves(pts)
                rows.append([escape(p), escape(name), f'<td class="num">{len(pts)}</td>',
                             f'<td class="num">{fmt(early)}</td>', f'<td class="num">{fmt(late)}</td>'])
        body += ["<h2>means, first half and second half of each curve</h2>",
                 table(["metric", "run", "points", "first half", "second half"], rows)]
    else:
        body.append('<p class="note">none of the panels\' metrics was logged by these runs</p>')
    return body


def write_compare_report(path: Path, runs: dict[str, Path], panels: dict[str, str] | None = None,
                         title: str = "runs compared") -> Path:
    atomic_write_text(Path(path), compare_html(runs, panels, title))
    return Path(path)
