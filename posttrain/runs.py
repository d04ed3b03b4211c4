"""The run folder: what a training run writes, and how to read it back for inference, evaluation or shipping.

A run folder holds ``config.yaml`` (the resolved config), ``adapter/`` (LoRA) or ``model/`` (full fine-tuning),
``metrics.jsonl``, ``summary.json``, ``report.html``; a reward or prm run also ``score_head.safetensors``; a PPO
run also ``critic/``. Everything that knows this layout lives here. Layer 3: imports config, models, io, errors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from posttrain.config import ModelConfig
from posttrain.models import Loaded, Quantization, dequantize_, load_adapter, load_model

CONFIG_FILE = "config.yaml"
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
HEAD_FILE = "score_head.safetensors"
CRITIC_DIR = "critic"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
DATA_FILES = "data_files.json"  # the data files a run read, hashed when it began: the model card's data section


def quantization_of(mcfg: ModelConfig) -> Quantization | None:
    return None if mcfg.quantization == "none" else Quantization(mcfg.quantization, mcfg.double_quant)


def data_files_of(config: dict[str, Any]) -> list[str]:
    """The data files a job config (as a dict: ``model_dump()`` or a run's config.yaml) reads: train, eval, the
    mixed-in file and the replay prompts."""
    d = config.get("data") or {}
    paths = [d.get("train"), d.get("eval"), (d.get("mix") or {}).get("path"), (d.get("replay") or {}).get("prompts")]
    return [p for p in paths if isinstance(p, str) and p]


def resolve_adapter(path: str) -> Path:
    """An adapter folder, or the ``adapter/`` of a run folder."""
    p = Path(path)
    if (p / "adapter_config.json").exists():
        return p
    if (p / ADAPTER_DIR / "adapter_config.json").exists():
        return p / ADAPTER_DIR
    raise FileNotFoundError(f"{path} is neither a PEFT adapter folder nor a run folder with adapter/ in it")


def run_config_of(adapter: str) -> dict[str, Any]:
    """The config.yaml of the run an adapter (or run folder) came from; empty for a bare adapter folder."""
    p = Path(adapter)
    for cfg in (p / CONFIG_FILE, p.parent / CONFIG_FILE):
        if cfg.exists():
            import yaml  # only here: reading a run back is rare, and yaml is slow to import

            return yaml.safe_load(cfg.read_text()) or {}
    return {}


def run_quantization(adapter: str) -> Quantization | None:
    """The 4-bit setting a run's base was trained in (None for an adapter folder without a run config)."""
    model = run_config_of(adapter).get("model") or {}
    return quantization_of(ModelConfig(**{k: v for k, v in model.items() if k in ModelConfig.model_fields}))


def init_adapter_of(adapter: str) -> str | None:
    return (run_config_of(adapter).get("model") or {}).get("init_adapter")


def base_of(adapter: str) -> str | None:
    """The base model a run or adapter was trained from."""
    run = run_config_of(adapter)
    if run:
        return (run.get("model") or {}).get("name")
    meta = json.loads((resolve_adapter(adapter) / "adapter_config.json").read_text())
    return meta.get("base_model_name_or_path")


def load_run_base(model_name: str | None, adapter: str, *, dtype: str = "auto", device: str = "auto") -> Loaded:
    """The base an adapter was trained on: in 4 bits if the run was QLoRA, with the run's ``init_adapter`` (e.g.
    the SFT adapter under a DPO run) merged in."""
    loaded = load_model(model_name, dtype=dtype, device=device, quantization=run_quantization(adapter))
    init = init_adapter_of(adapter)
    if init:
        loaded.model = load_adapter(loaded.model, str(resolve_adapter(init))).merge_and_unload()
    return loaded


def load_for_inference(model_name: str | None, adapter: str | None, *, dtype: str = "auto", device: str = "auto",
                       merge: bool = True) -> Loaded:
    """Base model, optionally with a LoRA adapter (merged for speed unless ``merge=False``).

    ``adapter`` may be an adapter folder or a run folder holding ``adapter/``; with no model name, the base
    recorded in the run's config.yaml (or the adapter's own config) is used.
    """
    if not adapter:
        loaded = load_model(model_name, dtype=dtype, device=device)
        loaded.model.eval()
        return loaded
    adapter_dir = resolve_adapter(adapter)
    loaded = load_run_base(model_name or base_of(adapter), adapter, dtype=dtype, device=device)
    if merge:  # a QLoRA adapter merges into the de-quantized base it was trained against
        dequantize_(loaded.model)
    model = load_adapter(loaded.model, str(adapter_dir))
    loaded.model = model.merge_and_unload() if merge else model
    loaded.model.eval()
    return loaded


def trained_model_of(run_dir: Path, finetune: str, base_name: str | None, *, use_base: bool = False) -> tuple[
        str | None, str | None]:
    """(model name, adapter) that ``load_for_inference`` needs for a finished run: the run's ``model/`` after full
    fine-tuning, its adapter after LoRA, the base alone with ``use_base``."""
    if use_base:
        return base_name, None
    if finetune == "full":
        return str(run_dir / MODEL_DIR), None
    return base_name, str(run_dir)
