"""The steps every recipe takes, in the order it takes them: begin the run, prepare the model, build the loop's
options, save, summarise. Each is one call in a recipe, so a recipe reads as its method's story.

Layer 7: may import everything below it and posttrain.config.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from pydantic import BaseModel

from posttrain.config import (
    DPOConfig,
    JobConfig,
    KTOConfig,
    ModelConfig,
    PRMConfig,
    RewardConfig,
    SFTConfig,
    TrainConfig,
    dump_config,
)
from posttrain.engine import LoopOptions, console, read_metrics, train_loop
from posttrain.engine.distributed import device_for, gather_for_inference, shard, world
from posttrain.engine.trackers import check_installed
from posttrain.errors import ConfigError
from posttrain.io import atomic_dir, atomic_write_text, sha256_of
from posttrain.models import (
    Loaded,
    apply_lora,
    choose_device,
    format_trainable,
    format_weight_bytes,
    load_adapter,
    load_model,
    prepare_full,
    trainable_report,
    weight_bytes,
)
from posttrain.models.compile import compile_layers
from posttrain.models.heads import save_head
from posttrain.models.kernels import apply_liger
from posttrain.report import write_run_report
from posttrain.runs import (
    CONFIG_FILE,
    DATA_FILES,
    HEAD_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    data_files_of,
    quantization_of,
    resolve_adapter,
)

T = TypeVar("T")


@dataclass
class Job:
    """A run that has begun: its folder, start time and loaded base model."""

    out: Path
    t0: float
    loaded: Loaded

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer


def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_base(mcfg: ModelConfig) -> Loaded:
    return load_model(mcfg.name, dtype=mcfg.dtype, device=device_for(mcfg.device, world()),
                      attn_implementation=mcfg.attn_implementation, quantization=quantization_of(mcfg))


def begin_run(cfg: JobConfig) -> Job:
    """The run folder, the start time and the loaded base model (seeded, announced). A tracker of train.report_to
    whose package is missing stops the run here, before the model loads (every rank checks, so none waits)."""
    check_installed(cfg.train.report_to)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.train.seed)
    t0 = time.perf_counter()
    loaded = load_base(cfg.model)
    console.print(f"model {loaded.path} on {loaded.device}, numerics {loaded.numerics.describe()}")
    return Job(out, t0, loaded)


def announce(kind: str, lines: list[str]) -> None:
    for line in lines:
        console.print(f"{kind}: {line}")


def prepare_model(cfg: JobConfig, loaded: Loaded) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Merge ``model.init_adapter`` (if any), switch on checkpointing, and add LoRA or unfreeze everything."""
    model = loaded.model
    base_bytes = weight_bytes(model) if cfg.model.quantization != "none" else None  # the base alone, no adapters
    if cfg.model.init_adapter:
        model = load_adapter(model, str(resolve_adapter(cfg.model.init_adapter))).merge_and_unload()
        console.print(f"merged {cfg.model.init_adapter} into the base")
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    seed_everything(cfg.train.seed)  # adapter initialisation does not depend on what loading consumed
    if cfg.finetune == "lora":
        model = apply_lora(model, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                           target_modules=cfg.lora.target_modules)
    else:
        model = prepare_full(model)
    if cfg.model.liger:
        console.print(f"Liger kernels: {', '.join(apply_liger(model, next(model.parameters()).device))}")
    if cfg.model.compile:
        console.print(f"torch.compile: {compile_layers(model)} decoder layers (compiled in the first steps)")
    report = trainable_report(model)
    report["numerics"] = loaded.numerics.as_dict() if loaded.numerics else None
    console.print(format_trainable(report))
    if base_bytes:
        report["base_weight_bytes"] = base_bytes
        console.print(format_weight_bytes(base_bytes, loaded.dtype))
    return model, report


def disable_dropout(model: torch.nn.Module, method: str) -> None:
    """Policy and reference must be the same network at step 0 (DPO loss ln 2, GRPO ratio 1); dropout would
    make every forward a different one."""
    dropped = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    for m in dropped:
        m.p = 0.0
    if dropped:
        console.print(f"dropout disabled in {len(dropped)} modules ({method} compares the policy with a reference)")


def choose_optimizer(t: TrainConfig, mcfg: ModelConfig) -> str:
    if t.optimizer != "auto":
        return t.optimizer
    on_gpu = choose_device(mcfg.device).type == "cuda"
    return "paged_adamw_8bit" if mcfg.quantization != "none" and on_gpu else "adamw"


def from_section(cls: type[T], section: BaseModel, **given: Any) -> T:
    """A plain settings dataclass (GRPOParams, LoopOptions, ...) filled from the config section of the same field
    names, plus what is ``given`` (derived values). The defaults live in the config alone, so the two cannot
    drift apart; a field that neither the section nor ``given`` has is an error here, not a silent default."""
    values = {f.name: given[f.name] if f.name in given else getattr(section, f.name, MISSING)
              for f in fields(cls) if f.init}
    missing = [k for k, v in values.items() if v is MISSING and not _has_default(cls, k)]
    if missing:
        raise TypeError(f"{cls.__name__}: {type(section).__name__} has no {', '.join(missing)}; pass them")
    return cls(**{k: v for k, v in values.items() if v is not MISSING})


def _has_default(cls: type, name: str) -> bool:
    f = next(f for f in fields(cls) if f.name == name)
    return f.default is not MISSING or f.default_factory is not MISSING


def loop_options(t: TrainConfig, total: int, mcfg: ModelConfig, loaded: Loaded | None = None) -> LoopOptions:
    return from_section(LoopOptions, t, total_steps=total, warmup_steps=round(t.warmup_ratio * total),
                        optimizer=choose_optimizer(t, mcfg),
                        autocast=loaded.numerics.autocast if loaded and loaded.numerics else None)  # chosen at load


def save_config(out: Path, cfg: JobConfig) -> None:
    """config.yaml, and data_files.json: the hashes of the data files as the run begins, so a model card states
    what was trained on rather than what the files hold by the time it is exported."""
    atomic_write_text(out / CONFIG_FILE, dump_config(cfg))
    files = {p: {"sha256": sha256_of(p), "bytes": Path(p).stat().st_size} for p in data_files_of(cfg.model_dump())
             if Path(p).is_file()}
    atomic_write_text(out / DATA_FILES, json.dumps(files, indent=2))


def shard_if_asked(cfg: SFTConfig | DPOConfig | KTOConfig | RewardConfig | PRMConfig,
                   model: torch.nn.Module) -> bool:
    """FSDP2 on the decoder layers when torchrun started several processes and train.distributed is fsdp."""
    w = world()
    if w.size > 1 and cfg.train.distributed == "fsdp":
        if cfg.model.compile:  # dynamo would trace FSDP2's gather/reshard hooks inside every compiled layer
            raise ConfigError("model.compile is not supported with train.distributed: fsdp; use "
                              "train.distributed: ddp, or model.compile: false")
        console.print(f"FSDP2: {shard(model)} decoder layers sharded over {w.size} processes")
        return True
    return False


def rank0_after(model: torch.nn.Module, sharded: bool) -> bool:
    """Whether this process writes the results (rank 0); sharded layers are gathered first, on every rank."""
    if sharded:
        gather_for_inference(model)
    return world().main


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """``save_pretrained`` (a PEFT adapter, or a whole HF model) from the parameters as the module holds them now.

    FSDP2's state-dict hooks report sharded tensors even while a layer is gathered; the live parameters are whole.
    """
    from torch.distributed.fsdp import FSDPModule

    if any(isinstance(m, FSDPModule) for m in model.modules()):
        model.save_pretrained(path, state_dict={n: p.detach() for n, p in model.named_parameters()})
    else:
        model.save_pretrained(path)


def lora_export(finetune: str, model: torch.nn.Module) -> Callable[[Path], None] | None:
    """What a checkpoint writes beside the optimizer state: the adapter (LoRA); nothing more for full weights."""
    return (lambda path: save_weights(model, path)) if finetune == "lora" else None


def head_export(finetune: str, lm: torch.nn.Module, head: torch.nn.Linear) -> Callable[[Path], None]:
    """What a scoring run's (reward, prm) checkpoint writes: the adapter (LoRA) and the score head beside it."""
    def export(path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        if finetune == "lora":
            save_weights(lm, path)
        save_head(head, path / HEAD_FILE)
    return export


def train_scorer(cfg: Any, job: Any, lm: torch.nn.Module, model: Any, method: Any, schedule: Any, total: int,
                 evaluate: Callable | None, start: Any) -> tuple[list[dict[str, Any]], Path] | None:
    """The shared middle of a scoring run (reward, prm): save the config, shard if asked, train with checkpoints of
    the adapter and head, then on rank 0 write the trained backbone and the score head. Returns (records, the
    backbone's folder), or None on the other ranks."""
    save_config(job.out, cfg)
    sharded = shard_if_asked(cfg, model)
    records = train_loop(model, method, schedule, loop_options(cfg.train, total, cfg.model, job.loaded), job.out,
                         evaluate=evaluate, export=head_export(cfg.finetune, lm, model.head), resume=start)
    if not rank0_after(model, sharded):  # rank 0 writes the results; the others hold the same weights
        return None
    final_dir = save_trained(lm, job.tokenizer, job.out, cfg.finetune)
    save_head(model.head, job.out / HEAD_FILE)
    return records, final_dir


def save_trained(model: torch.nn.Module, tokenizer: Any, out: Path, finetune: str) -> Path:
    """The PEFT adapter folder (LoRA) or a standalone HF model folder (full), written atomically."""
    dest = out / ("adapter" if finetune == "lora" else "model")

    def write(tmp: Path) -> None:
        save_weights(model, tmp)
        tokenizer.save_pretrained(tmp)

    return atomic_dir(dest, write)


def write_summary(job: Job, total: int, report: dict, lines: list[str], records: list[dict], final_dir: Path,
                  eval_key: str, extra: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """summary.json: where the result is, how long it took, and the first and last held-out evals (plus ``extra``);
    then report.html (those numbers as a page, with the curves). Every method ends here, so every run gets both."""
    out = job.out
    evals = [r for r in read_metrics(out / METRICS_FILE) if eval_key in r]
    stopped = next((r["stopped"] for r in records if "stopped" in r), None)  # train.max_minutes ran out
    summary = {"output": str(final_dir), "steps": stopped["steps"] if stopped else total,
               **({"stopped": stopped} if stopped else {}), "seconds": round(time.perf_counter() - job.t0, 1),
               "trainable": report["trainable"], "total_params": report["total"],
               "base_weight_bytes": report.get("base_weight_bytes"), "numerics": report.get("numerics"), "data": lines,
               "eval_before": evals[0] if evals else None, "eval_after": evals[-1] if evals else None,
               "final_loss": next((r["loss"] for r in reversed(records) if "loss" in r), None), **(extra or {})}
    atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=2))
    write_report(out)
    return summary, evals


def write_report(out: Path) -> Path | None:
    """report.html of a finished run; a failure only warns, since the weights and summary.json are already saved."""
    try:
        path = write_run_report(out)
    except Exception as e:  # noqa: BLE001 - a page must never cost the run that it describes
        console.print(f"[yellow]warning: report.html not written: {type(e).__name__}: {e}")
        return None
    console.print(f"report: {path}")
    return path
