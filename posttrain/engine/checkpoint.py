"""Atomic checkpoints: trainable weights, optimizer, scheduler, RNG and step.

A checkpoint is written into a temporary folder, closed with a COMPLETE marker, then renamed into place;
a crash mid-write leaves only a temporary folder that resume ignores.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from posttrain.engine.distributed import full_tree, shard_like
from posttrain.io import MARKER, atomic_dir


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, extra: dict[str, Any], keep: int,
                    export: Callable[[Path], None] | None = None, write_files: bool = True,
                    texts: dict[str, str] | None = None) -> Path | None:
    """Every rank calls it (sharded optimizer state is gathered into full tensors); ``write_files`` on one.

    Weights and optimizer state are stored whole, so a checkpoint resumes under any number of processes. ``texts``
    (file name -> content, e.g. the run's config.yaml) land inside the same atomic folder: a checkpoint and the
    config it was trained with can never disagree.
    """
    optimizer_state = full_tree(optimizer.state_dict())
    if not write_files:
        return None

    def write(tmp: Path) -> None:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": rng_state()},
                   tmp / "state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **extra}, indent=2))
        for name, text in (texts or {}).items():
            (tmp / name).write_text(text)
        if export is not None:
            export(tmp / "adapter")

    path = atomic_dir(root / f"step-{step:07d}", write)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / MARKER).exists()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def trainer_state(path: Path) -> dict[str, Any]:
    """A checkpoint's step, total steps, lr schedule and input hashes (the last two from this version on)."""
    return json.loads((path / "trainer_state.json").read_text())


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict:
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != expected:
        missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ValueError(f"checkpoint {path} does not match this model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]} (was it made with another model or LoRA config?)")
    wrong = [f"{n}: {tuple(t.shape)} vs {tuple(params[n].shape)}" for n, t in weights.items()
             if t.shape != params[n].shape]
    if wrong:
        raise ValueError(f"checkpoint {path} does not match this model's shapes (checkpoint vs model): "
                         f"{'; '.join(wrong[:2])} (was it made with another model or LoRA config?)")
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(shard_like(t, params[n]))
    state = torch.load(path / "state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    for group in optimizer.param_groups:  # moments of FSDP2-sharded parameters: back to this rank's shard
        for p in group["params"]:
            for k, v in optimizer.state.get(p, {}).items():
                if isinstance(v, torch.Tensor) and v.shape == p.shape:
                    optimizer.state[p][k] = shard_like(v, p)
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return trainer_state(path)
