"""Metrics to a JSONL file and to the run's trackers (engine/trackers.py), and a console line per logged step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console

from posttrain.engine.trackers import Tracker, numbers

console = Console(stderr=True, highlight=False)


class MetricsLog:
    """metrics.jsonl, and the same records to each tracker. The file is the record of truth: a tracker that fails
    after it started (a server gone away) is warned about and dropped, and the run goes on."""

    def __init__(self, path: Path, resume_step: int = 0, trackers: Sequence[Tracker] = (),
                 config: dict[str, Any] | None = None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        # A resumed run drops records written after its checkpoint, so the file reads like one clean run.
        kept = []
        if resume_step and path.exists():
            kept = [ln for ln in path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
        path.write_text("".join(ln + "\n" for ln in kept))
        self.trackers: list[Tracker] = []
        try:
            for tracker in trackers:
                tracker.start(config or {}, path.parent)
                self.trackers.append(tracker)
        except BaseException:
            self.close(failed=True)  # the ones already started are not left open
            raise
        # A resume starts a new tracker run: it gets the kept history first, so it too reads like one clean run.
        for rec in map(json.loads, kept):
            self._send(rec)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self._send(record)

    def _send(self, record: dict[str, Any]) -> None:
        values = numbers(record)
        if not values:
            return
        for tracker in list(self.trackers):
            try:
                tracker.log(values, int(record.get("step", 0)))
            except Exception as e:  # noqa: BLE001 - a tracker must never cost the run it records
                console.print(f"[yellow]warning: {type(tracker).__name__} dropped: {type(e).__name__}: {e}")
                self.trackers.remove(tracker)

    def close(self, failed: bool = False) -> None:
        """Hand each tracker the final evals (summary.json's eval_before and eval_after) and end its run."""
        final = final_evals(read_metrics(self.path)) if self.trackers else {}
        for tracker in self.trackers:
            try:
                tracker.finish(final, failed)
            except Exception as e:  # noqa: BLE001 - the weights and metrics.jsonl are what matter
                console.print(f"[yellow]warning: {type(tracker).__name__} did not finish: {type(e).__name__}: {e}")
        self.trackers = []

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, kind: type | None, *exc: Any) -> None:
        self.close(failed=kind is not None)


def final_evals(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The first and last eval records (those with an ``eval/`` number: every evaluate() names its keys so), the
    last training loss and the last step: what summary.json reports of a run's evals."""
    evals = [r for r in records if any(k.startswith("eval/") for k in numbers(r))]
    return {"eval_before": evals[0] if evals else None, "eval_after": evals[-1] if evals else None,
            "final_loss": next((r["loss"] for r in reversed(records) if "loss" in r), None),
            "steps": max((int(r.get("step", 0)) for r in records), default=0)}


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def format_line(rec: dict[str, Any], total_steps: int) -> str:
    parts = [f"step {rec['step']}/{total_steps}"]
    for key, fmt in (("loss", ".4f"), ("accuracy", ".2f"), ("rewards/margin", ".3f"), ("eval/loss", ".4f"),
                     ("eval/ppl", ".2f"), ("eval/accuracy", ".3f"), ("eval/rewards/margin", ".3f"), ("reward", ".3f"),
                     ("step_accuracy", ".2f"), ("eval/step_accuracy", ".3f"), ("eval/auroc", ".3f"),
                     ("kl", ".4f"), ("eval/reward", ".3f"), ("lr", ".2e"),
                     ("grad_norm", ".3f"), ("tokens_per_s", ".0f")):
        if key in rec:
            parts.append(f"{key.replace('tokens_per_s', 'tok/s').replace('rewards/', '')} {rec[key]:{fmt}}")
    return " | ".join(parts)
