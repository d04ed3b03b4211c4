"""OpenAI-compatible serving of one base model with many LoRA adapters, batched together in each forward.

Layer 6: may import models, rollout, runs, io and errors; never config (its command line is posttrain/cli/serve.py).
The names below load on first use (PEP 562): the engine loads torch, and ``posttrain.serve.http`` alone (the plumbing
posttrain ui reuses) needs none of it."""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {"Sampling": "api", "ServeError": "api", "BASE": "engine", "Engine": "engine", "Request": "scheduler",
          "Scheduler": "scheduler", "Server": "server", "serve": "server"}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'posttrain.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(f"posttrain.serve.{_HOMES[name]}"), name)
