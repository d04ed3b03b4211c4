"""The table of rollout engines, ``rollout.engine``'s values (``interface`` says what an engine does).

Layer 3 (rollout).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from posttrain.rollout.client import ServerEngine
from posttrain.rollout.interface import EngineSettings, HFEngine, RolloutEngine
from posttrain.rollout.vllm import vllm_engine


def _hf(model: torch.nn.Module, tokenizer, settings: EngineSettings, run_dir: Path, base_dir: str) -> RolloutEngine:
    return HFEngine(model, tokenizer)


def _server(model: torch.nn.Module, tokenizer, settings: EngineSettings, run_dir: Path,
            base_dir: str) -> RolloutEngine:
    return ServerEngine.connect(model, tokenizer, settings, run_dir)


def _vllm(model: torch.nn.Module, tokenizer, settings: EngineSettings, run_dir: Path, base_dir: str) -> RolloutEngine:
    return vllm_engine(model, tokenizer, settings, run_dir, base_dir)


# name -> builder(model, tokenizer, settings, run folder, base model folder); config.RolloutSection.engine's twin.
ENGINES: dict[str, Callable[[torch.nn.Module, object, EngineSettings, Path, str], RolloutEngine]] = {
    "hf": _hf, "server": _server, "vllm": _vllm}


def make_engine(model: torch.nn.Module, tokenizer, settings: EngineSettings, run_dir: Path,
                base_dir: str) -> RolloutEngine:
    """The configured engine (``settings.engine``, a key of ``ENGINES``)."""
    if settings.engine not in ENGINES:
        raise ValueError(f"unknown rollout engine {settings.engine!r}; known: {', '.join(ENGINES)}")
    return ENGINES[settings.engine](model, tokenizer, settings, run_dir, base_dir)
