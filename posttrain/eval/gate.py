"""Gates: a candidate model against a baseline on every configured metric; any failed check blocks the next stage.

Each change is oriented so that positive is better (candidate - baseline when higher is better, baseline -
candidate when lower is better), so one rule reads the same for an accuracy and for a loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# A change equal to its threshold passes; this slack keeps float rounding (0.45 - 0.40 = 0.04999...) from
# deciding a gate. It is far below any difference an eval set can resolve.
_SLACK = 1e-9


@dataclass
class Rule:
    metric: str                              # "suite/metric", e.g. "in_domain/exact", "ood/loss"
    min_lift: float | None = None            # improvement over baseline must be >= this (metric units)
    min_relative_lift: float | None = None   # improvement >= this * |baseline| (0.05 = 5% over baseline)
    max_regression: float | None = None      # improvement >= -this

    def __post_init__(self) -> None:
        if self.min_lift is None and self.min_relative_lift is None and self.max_regression is None:
            raise ValueError(f"gate rule on {self.metric!r} sets no threshold: give min_lift, min_relative_lift "
                             "or max_regression")


def _thresholds(rule: Rule, baseline: float) -> list[tuple[str, float, str]]:
    """(human-readable rule, required oriented change, note) for each threshold the rule sets."""
    out = []
    if rule.min_lift is not None:
        out.append((f">= {rule.min_lift:+.3f}", rule.min_lift, ""))
    if rule.min_relative_lift is not None:
        need = rule.min_relative_lift * abs(baseline)
        out.append((f">= {100 * rule.min_relative_lift:+.1f}% of baseline", need, f"needs {need:+.4g}"))
    if rule.max_regression is not None:
        out.append((f"no worse than {-rule.max_regression:+.3f}", -rule.max_regression, ""))
    return out


def _rule_texts(rule: Rule) -> list[str]:
    return [text for text, _, _ in _thresholds(rule, 0.0)]


def check_gate(name: str, rules: list[Rule], baseline: dict[str, float], candidate: dict[str, float],
               higher_is_better: dict[str, bool], *, baseline_name: str = "baseline",
               candidate_name: str = "candidate") -> dict:
    """Every threshold of every rule as one check; the gate passes only when all checks pass. A metric that either
    side lacks, or whose direction is unknown, or a change that is not a number, fails its checks."""
    if not rules:
        raise ValueError(f"gate {name!r} has no rules: it would pass anything")
    checks = []
    for rule in rules:
        b, c = baseline.get(rule.metric), candidate.get(rule.metric)
        missing = [who for who, v in ((baseline_name, b), (candidate_name, c)) if v is None]
        if missing:
            note = f"{' and '.join(missing)} {'lack' if len(missing) == 2 else 'lacks'} {rule.metric}"
            checks += [{"metric": rule.metric, "baseline": b, "candidate": c, "change": None, "rule": text,
                        "passed": False, "note": note} for text in _rule_texts(rule)]
            continue
        if rule.metric not in higher_is_better:
            checks += [{"metric": rule.metric, "baseline": b, "candidate": c, "change": None, "rule": text,
                        "passed": False, "note": f"no direction known for {rule.metric} (higher or lower better?)"}
                       for text in _rule_texts(rule)]
            continue
        change = (c - b) if higher_is_better[rule.metric] else (b - c)
        for text, need, note in _thresholds(rule, b):
            passed = not math.isnan(change) and change >= need - _SLACK * max(1.0, abs(b), abs(c))
            if math.isnan(change):
                note = "not a number"
            checks.append({"metric": rule.metric, "baseline": b, "candidate": c, "change": change, "rule": text,
                           "passed": passed, "note": note})
    return {"name": name, "candidate": candidate_name, "baseline": baseline_name,
            "passed": all(ch["passed"] for ch in checks), "checks": checks}


def _num(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "missing"
    return f"{value:+.4g}" if signed else f"{value:.4g}"


def gate_table(verdict: dict):
    """A rich Table of a ``check_gate`` verdict: PASS or BLOCKED in the title, one line per check."""
    from rich.table import Table

    status = "[bold green]PASS[/]" if verdict["passed"] else "[bold red]BLOCKED[/]"
    table = Table(title=f"gate {verdict['name']}: {verdict['candidate']} vs {verdict['baseline']}: {status}")
    for col, just in (("metric", "left"), (verdict["baseline"], "right"), (verdict["candidate"], "right"),
                      ("change (+ better)", "right"), ("rule", "left"), ("", "left"), ("note", "left")):
        table.add_column(col, justify=just)
    for ch in verdict["checks"]:
        table.add_row(ch["metric"], _num(ch["baseline"]), _num(ch["candidate"]), _num(ch["change"], signed=True),
                      ch["rule"], "[green]pass[/]" if ch["passed"] else "[red]FAIL[/]", ch["note"])
    return table
