"""What an environment for multi-turn RL is: ``reset(row)`` gives the opening chat, ``step(assistant message)``
gives the tool results (or ends the episode with a reward), and ``tools`` is what the model is told it may call.
The rollout (``rollout.multiturn``) duck-types this protocol; ``StepResult`` is what ``step`` returns.

Layer 4 (envs): imports nothing from posttrain.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

INFO_KEYS = ("tool_calls", "tool_errors", "timeouts", "truncated")


@dataclass
class StepResult:
    """The environment's answer to one assistant message.

    ``observation``: messages to append to the chat (tool results, or a user message); None when the episode is
    over. ``reward`` counts only when ``done``. ``info``: counts for this step (``INFO_KEYS``), which the rollout
    sums over the episode and logs."""
    observation: list[dict[str, Any]] | None
    reward: float
    done: bool
    info: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Environment(Protocol):
    """One episode at a time; the rollout builds a fresh environment per trajectory, so it may hold state."""

    tools: list[dict[str, Any]]  # OpenAI function definitions, as apply_chat_template(tools=...) takes them

    def reset(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """The opening chat messages for a data row."""
        ...

    def step(self, assistant: dict[str, Any]) -> StepResult:
        """Act on the model's message: ``{"role": "assistant", "content": str, "tool_calls": [...]}``."""
        ...


def resolve(path: str, what: str) -> Any:
    """The object named by a dotted path ``package.module:name`` (or ``package.module.name``); ValueError naming
    ``what`` (e.g. "environment") when it cannot be imported."""
    module, sep, attr = path.partition(":")
    if not sep:
        module, _, attr = path.rpartition(".")
    if not module or not attr:
        raise ValueError(f"{what} {path!r} is not a dotted path such as mypkg.module:name")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"{what} {path!r}: cannot import {attr!r} from {module!r} ({exc})") from None
