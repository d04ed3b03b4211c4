"""Environments for multi-turn RL with tools: what a model may call, what it gets back, and how its answer scores.

``make_environment(name, options)`` is how a config names one (``env: {name: tools, options: {...}}``): a built-in
from ``ENVIRONMENTS`` or a user's class or factory by dotted path (``mypkg.envs:MyEnv``), called with the options.
It returns a factory, since the rollout builds a fresh environment per trajectory (environments hold state), and
builds one at once so that a bad option is reported before any model loads.

Layer 4: may import rewards, errors and lower layers; never methods or config.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from posttrain.envs.base import Environment, StepResult, resolve
from posttrain.envs.tool_env import VERIFIERS, ToolEnv
from posttrain.envs.tools import TOOLS, Tool

ENVIRONMENTS: dict[str, Callable[..., Environment]] = {"tools": ToolEnv}


def make_environment(name: str, options: dict[str, Any] | None = None) -> Callable[[], Environment]:
    """A factory of fresh environments; ValueError (naming the built-ins) for an unknown name or bad options."""
    if name in ENVIRONMENTS:
        cls = ENVIRONMENTS[name]
    elif isinstance(name, str) and (":" in name or "." in name):
        cls = resolve(name, "environment")
        if not callable(cls):
            raise ValueError(f"environment {name!r} is not a class or a function")
    else:
        raise ValueError(f"unknown environment {name!r}; built-ins: {', '.join(ENVIRONMENTS)}; or a dotted path "
                         "such as mypkg.envs:MyEnv")
    options = dict(options or {})
    factory = functools.partial(cls, **options)
    try:
        env = factory()
    except TypeError as exc:
        raise ValueError(f"environment {name!r}: options {sorted(options)} do not fit it ({exc})") from None
    except ValueError as exc:
        raise ValueError(f"environment {name!r}: {exc}") from None
    missing = [a for a in ("tools", "reset", "step") if not hasattr(env, a)]
    if missing:
        raise ValueError(f"environment {name!r} lacks {', '.join(missing)} (see posttrain.envs.Environment)")
    return factory


__all__ = ["ENVIRONMENTS", "TOOLS", "VERIFIERS", "Environment", "StepResult", "Tool", "ToolEnv",
           "make_environment"]
