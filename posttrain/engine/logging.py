"""Metrics to a JSONL file (and TensorBoard when installed), and a console line per logged step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console

console = Console(stderr=True, highlight=False)


class MetricsLog:
    def __init__(self, path: Path, resume_step: int = 0, tensorboard: bool = True):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        # A resumed run drops records written after its checkpoint, so the file reads like one clean run.
        kept = []
        if resume_step and path.exists():
            kept = [ln for ln in path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
        path.write_text("".join(ln + "\n" for ln in kept))
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(path.parent / "tensorboard"))
            except ImportError:
                pass

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, record.get("step", 0))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


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
