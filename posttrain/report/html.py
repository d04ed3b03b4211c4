"""The page furniture every report shares: its CSS, number formatting and HTML tables.

Layer 6 (report): imports nothing from posttrain.
"""

from __future__ import annotations

import math
import re
from html import escape
from typing import Any, Iterable

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


def number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def fmt(v: Any, signed: bool = False) -> str:
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


def seconds(s: float | None) -> str:
    if s is None:
        return EM_DASH
    return f"{s:.1f} s" if s < 60 else f"{int(s // 60)} min {s % 60:02.0f} s"


def better(key: str) -> bool | None:
    """A guess of a run metric's direction, only to colour the change column; unknown stays uncoloured."""
    name = key.removeprefix("eval/")
    if re.search(r"(^|/|_)(loss|ppl)$", name):
        return False
    if re.search(r"accuracy|margin|^auroc(_z)?$|f1$|^reward($|/)|^watch|exact", name):
        return True
    return None


def cell_class(value: Any, base: Any, higher_is_better: bool | None) -> str:
    v, b = number(value), number(base)
    if higher_is_better is None or v is None or b is None or v == b:
        return "num"
    return "num better" if (v > b) == higher_is_better else "num worse"


def table(head: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    """Cells are escaped HTML; a cell that needs a class comes as its own ``<td ...>`` element."""
    out = ["<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for row in rows:
        out.append("<tr>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in row) + "</tr>")
    return "\n".join(out) + "</table>"


def page(title: str, body: list[str]) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
