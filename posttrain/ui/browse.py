"""The runs browser's view of a runs directory: which folders are runs, what each is doing, its latest records.

A run folder is a directory with config.yaml or metrics.jsonl (posttrain/runs.py has the layout). A folder that is
not a run but holds runs (a workflow's output: one run per stage) is looked into once, and its runs are named
``workflow/stage``. Everything is read from the files on each request: the UI keeps no state a run could outgrow.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.io import read_json

# posttrain.runs' names for these files, written again here because importing it loads torch (through models), and
# the runs table must answer before that has happened; tests/test_ui.py checks that the two agree.
CONFIG_FILE, METRICS_FILE, SUMMARY_FILE = "config.yaml", "metrics.jsonl", "summary.json"

# A run with no summary.json whose files have not changed for this long is taken to have died. An eval of the
# embedded model on a busy 2-core CPU was seen to take a few minutes between two records; less would call live
# runs failed.
STALE_S = 600.0
# Metrics the runs table shows as the run's key number, the first one logged wins: the held-out numbers first.
KEY_METRICS = ("eval/reward", "eval/accuracy", "eval/win_rate", "eval/loss", "reward", "accuracy", "loss")
_TAIL_BYTES = 1 << 16
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class RunNotFound(LookupError):
    """No run folder of that name under the runs directory (or a name that would lead outside it)."""


@dataclass(frozen=True)
class RunInfo:
    name: str
    path: Path
    method: str
    status: str  # running | finished | failed
    last_step: int | None
    key_metric: str | None
    key_value: float | None
    updated: float  # seconds since the epoch of the newest file read

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "method": self.method, "status": self.status, "last_step": self.last_step,
                "key_metric": self.key_metric, "key_value": self.key_value, "updated": self.updated}


def valid_name(name: str) -> bool:
    """A run name the form may create: one path part of letters, digits, '.', '_' and '-' (no '..', no slash)."""
    return bool(_NAME.match(name)) and ".." not in name


def is_run(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file() or (folder / METRICS_FILE).is_file()


def _children(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


def run_folders(root: Path) -> dict[str, Path]:
    """{name: folder} of every run directly under ``root``, and of the runs one level inside a non-run folder."""
    out = {}
    for child in _children(root):
        if is_run(child):
            out[child.name] = child
        else:
            out.update({f"{child.name}/{g.name}": g for g in _children(child) if is_run(g)})
    return out


def resolve_run(root: Path, name: str) -> Path:
    """The folder of run ``name``, which must be one that ``run_folders`` lists (so nothing outside root)."""
    folder = run_folders(root).get(name)
    if folder is None:
        raise RunNotFound(f"no run {name!r} under {root}")
    return folder


def tail_records(path: Path, max_bytes: int = _TAIL_BYTES) -> list[dict[str, Any]]:
    """The complete JSON lines in the last ``max_bytes`` of a metrics file: enough for its latest step without
    reading a long run's whole history on every poll. A line being written (no newline yet) is left out."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return []
    lines = data.split(b"\n")
    lines = lines[1:-1] if size > max_bytes else lines[:-1]  # a cut first line and the unfinished last one
    return [r for r in map(_parse, lines) if r is not None]


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def _method(folder: Path) -> str:
    try:
        text = (folder / CONFIG_FILE).read_text()
    except OSError:
        return "?"
    m = re.search(r"^method:\s*['\"]?([\w-]+)", text, re.M)
    return m.group(1) if m else "?"


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def run_status(folder: Path, alive: bool | None = None, now: float | None = None) -> str:
    """finished (summary.json written), running (its process is alive; or, when no process is known, a file
    changed in the last STALE_S seconds) or failed."""
    if (folder / SUMMARY_FILE).is_file():
        return "finished"
    if alive is not None:
        return "running" if alive else "failed"
    updated = max(_mtime(folder / METRICS_FILE), _mtime(folder / CONFIG_FILE), _mtime(folder))
    return "running" if (now or time.time()) - updated < STALE_S else "failed"


def run_info(name: str, folder: Path, alive: bool | None = None) -> RunInfo:
    records = tail_records(folder / METRICS_FILE)
    steps = [r["step"] for r in records if isinstance(r.get("step"), int)]
    key = value = None
    for k in KEY_METRICS:
        hit = next((r[k] for r in reversed(records) if isinstance(r.get(k), (int, float))), None)
        if hit is not None:
            key, value = k, float(hit)
            break
    summary = read_json(folder / SUMMARY_FILE) if (folder / SUMMARY_FILE).is_file() else None
    if isinstance(summary, dict) and not steps and isinstance(summary.get("steps"), int):
        steps = [summary["steps"]]
    updated = max(_mtime(folder / METRICS_FILE), _mtime(folder / SUMMARY_FILE), _mtime(folder / CONFIG_FILE))
    return RunInfo(name=name, path=folder, method=_method(folder), status=run_status(folder, alive),
                   last_step=max(steps) if steps else None, key_metric=key, key_value=value, updated=updated)
