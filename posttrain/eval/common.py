"""What every eval suite kind shares: the arguments ``run_suite`` passes it, the result it returns, and its rows.

Kept apart from ``suites`` (the table of kinds) so the kind modules can build results while that table imports
them. Layer 6 (eval): imports data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from posttrain.data import read_rows


@dataclass
class SuiteResult:
    metrics: dict[str, float]
    higher_is_better: dict[str, bool]
    outputs: list[str] | None = None       # generations, when the suite generates
    details: list[dict] = field(default_factory=list)  # small per-row records for the report


@dataclass
class SuiteArgs:
    """What ``run_suite`` passes every suite besides the model, tokenizer and file."""
    options: dict[str, Any]
    limit: int | None = None
    system_prompt: str | None = None
    chat_template: str | None = None
    reference_outputs: list[str] | None = None
    judge: Any = None
    batch_size: int = 8


def limited_rows(path: str, limit: int | None) -> list[tuple[int, dict[str, Any]]]:
    rows = read_rows(path)
    return rows[:limit] if limit else rows
