"""A run's start and its lr schedule on resume: what the loop needs to continue a run where a checkpoint left it.

The check of a new config against the checkpoint's (what ``--resume`` may change) reads configs, so it lives above,
in posttrain/recipes/_resume.py; this module is config-free. Layer 3: imports engine and errors only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.engine.schedule import Schedule
from posttrain.errors import ConfigError

LEGACY_SCHEDULE = ("was written before checkpoints recorded their lr schedule, so its remaining steps cannot be "
                   "re-laid honestly; resume it with its old train.max_steps")



@dataclass(frozen=True)
class Resume:
    """``--resume`` as asked: continue from the last complete checkpoint. ``extend_steps`` lets ``train.max_steps``
    change (up or down); the lr schedule's remaining steps are re-laid from the current lr to the floor."""
    extend_steps: bool = False


@dataclass
class RunStart:
    """Where a run starts: the config and input hashes written into each of its checkpoints, and when it resumes,
    the checkpoint that was checked, and the allowed changes (recorded in metrics.jsonl)."""
    config_text: str | None = None
    inputs: dict[str, str] = field(default_factory=dict)
    checkpoint: Path | None = None
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    extend_steps: bool = False


def resumed_schedule(state: dict[str, Any], planned: Schedule, extend_steps: bool) -> Schedule:
    """The lr schedule from a checkpoint on: the one it was trained with (it may itself have been re-laid), re-laid
    over a new length only when ``extend_steps`` allows; never a fresh schedule drawn over the whole new length."""
    stored = Schedule(**state["schedule"]) if "schedule" in state else None
    old_total = stored.total_steps if stored else state.get("total_steps")
    if old_total == planned.total_steps:
        return stored or planned
    if not extend_steps:
        raise ConfigError(f"--resume: the checkpoint at step {state['step']} is from a run of {old_total} steps and "
                          f"this one has {planned.total_steps}; keep the length, or pass --extend-steps")
    if stored is None:
        raise ConfigError(f"--extend-steps: the checkpoint at step {state['step']} {LEGACY_SCHEDULE}")
    return stored.relaid(state["step"], planned.total_steps)
