"""Run a configured job end to end: load, validate data, train, evaluate, save. The layer that reads configs."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import torch

from posttrain.config import DataConfig, ModelConfig, SFTConfig, dump_config
from posttrain.data import BatchPlan, build_examples, eval_batches, holdout_split
from posttrain.data.render import Example
from posttrain.engine import LoopOptions, atomic_dir, atomic_write_text, console, train_loop
from posttrain.eval import heldout_loss, sample_generations
from posttrain.methods import SFT
from posttrain.models import (Loaded, apply_lora, format_trainable, load_adapter, load_model, prepare_full,
                              trainable_report)


def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_template(template: str | None) -> str | None:
    if template and template.endswith(".jinja") and Path(template).is_file():
        return Path(template).read_text()
    return template


def load_base(mcfg: ModelConfig) -> Loaded:
    return load_model(mcfg.name, dtype=mcfg.dtype, device=mcfg.device, attn_implementation=mcfg.attn_implementation)


def prepare_data(dcfg: DataConfig, tokenizer) -> tuple[list[Example], list[Example], list[list[dict]], list[str]]:
    """Train and held-out examples, held-out chats (for samples), and report lines."""
    template = resolve_template(dcfg.chat_template)
    kw = dict(fmt=dcfg.format, system_prompt=dcfg.system_prompt, max_seq_len=dcfg.max_seq_len,
              overlong=dcfg.overlong, chat_template=template)
    train, train_rows, report = build_examples(dcfg.train, tokenizer, **kw)
    lines = [report.summary()]
    if dcfg.eval:
        held, held_rows, eval_report = build_examples(dcfg.eval, tokenizer, **kw)
        lines.append(eval_report.summary())
    else:
        keep, hold = holdout_split(len(train), dcfg.eval_fraction, dcfg.split_seed)
        held, held_rows = [train[i] for i in hold], [train_rows[i] for i in hold]
        train = [train[i] for i in keep]
        if hold:
            lines.append(f"held out {len(hold)} of {len(keep) + len(hold)} examples "
                         f"(eval_fraction={dcfg.eval_fraction}, split_seed={dcfg.split_seed})")
    return train, held, [m for _, m in held_rows], lines


def run_sft(cfg: SFTConfig, *, resume: bool = False) -> dict[str, Any]:
    """Supervised fine-tuning (LoRA or full); writes adapter/model, config.yaml, metrics.jsonl, summary.json."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.train.seed)
    t0 = time.perf_counter()
    loaded = load_base(cfg.model)
    tok = loaded.tokenizer
    console.print(f"model {loaded.path} on {loaded.device} in {str(loaded.dtype).removeprefix('torch.')}")
    train, held, held_chats, lines = prepare_data(cfg.data, tok)
    for line in lines:
        console.print(f"data: {line}")

    model = loaded.model
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    seed_everything(cfg.train.seed)  # adapter initialisation does not depend on what loading consumed
    if cfg.finetune == "lora":
        model = apply_lora(model, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                           target_modules=cfg.lora.target_modules)
    else:
        model = prepare_full(model)
    report = trainable_report(model)
    console.print(format_trainable(report))

    t = cfg.train
    plan = BatchPlan(train, micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum, seed=t.seed,
                     pad_id=tok.pad_token_id, packing=cfg.data.packing, max_seq_len=cfg.data.max_seq_len)
    total = t.max_steps or plan.steps_for(t.epochs)
    opts = LoopOptions(total_steps=total, lr=t.lr, warmup_steps=round(t.warmup_ratio * total),
                       min_lr_ratio=t.min_lr_ratio, weight_decay=t.weight_decay, adam_betas=t.adam_betas,
                       max_grad_norm=t.max_grad_norm, log_every=t.log_every, eval_every=t.eval_every,
                       save_every=t.save_every, save_total_limit=t.save_total_limit)
    console.print(f"training {total} steps: {len(plan.units)} {'packed rows' if cfg.data.packing else 'examples'} "
                  f"x {t.epochs} epochs, {plan.per_step} per step ({t.micro_batch_size} x {t.grad_accum} accumulation)")
    held_batches = eval_batches(held, t.micro_batch_size, tok.pad_token_id) if held else []
    evaluate = (lambda m: heldout_loss(m, held_batches, t.loss_chunk_size)) if held_batches else None
    export = (lambda path: model.save_pretrained(path)) if cfg.finetune == "lora" else None
    atomic_write_text(out / "config.yaml", dump_config(cfg))
    records = train_loop(model, SFT(t.loss_chunk_size), plan, opts, out, evaluate=evaluate, export=export,
                         resume=resume)

    final_dir = save_trained(model, tok, out, cfg.finetune)
    samples = []
    if cfg.eval_samples and held_chats:
        samples = sample_generations(model, tok, held_chats[:cfg.eval_samples],
                                     chat_template=resolve_template(cfg.data.chat_template))
        atomic_write_text(out / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
    evals = [r for r in _all_records(out) if "eval/loss" in r]
    summary = {"output": str(final_dir), "steps": total, "seconds": round(time.perf_counter() - t0, 1),
               "trainable": report["trainable"], "total_params": report["total"], "data": lines,
               "eval_before": evals[0] if evals else None, "eval_after": evals[-1] if evals else None,
               "final_loss": next((r["loss"] for r in reversed(records) if "loss" in r), None)}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    if evals:
        console.print(f"held-out loss {evals[0]['eval/loss']:.4f} -> {evals[-1]['eval/loss']:.4f} "
                      f"(ppl {evals[0]['eval/ppl']:.2f} -> {evals[-1]['eval/ppl']:.2f})")
    console.print(f"saved {final_dir}")
    return {**summary, "samples": samples}


def _all_records(out: Path) -> list[dict[str, Any]]:
    from posttrain.engine import read_metrics

    return read_metrics(out / "metrics.jsonl")


def save_trained(model: torch.nn.Module, tokenizer, out: Path, finetune: str) -> Path:
    """The PEFT adapter folder (LoRA) or a standalone HF model folder (full), written atomically."""
    dest = out / ("adapter" if finetune == "lora" else "model")

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return atomic_dir(dest, write)


def load_for_inference(model_name: str | None, adapter: str | None, *, dtype: str = "auto", device: str = "auto",
                       merge: bool = True) -> Loaded:
    """Base model, optionally with a LoRA adapter (merged for speed unless ``merge=False``).

    ``adapter`` may be an adapter folder or a run folder holding ``adapter/``; with no model name, the base
    recorded in the run's config.yaml (or the adapter's own config) is used.
    """
    adapter_dir = None
    if adapter:
        adapter_dir = resolve_adapter(adapter)
        if model_name is None:
            model_name = base_of(adapter)
    loaded = load_model(model_name, dtype=dtype, device=device)
    if adapter_dir is not None:
        model = load_adapter(loaded.model, str(adapter_dir))
        loaded.model = model.merge_and_unload() if merge else model
    loaded.model.eval()
    return loaded


def resolve_adapter(path: str) -> Path:
    p = Path(path)
    if (p / "adapter_config.json").exists():
        return p
    if (p / "adapter" / "adapter_config.json").exists():
        return p / "adapter"
    raise FileNotFoundError(f"{path} is neither a PEFT adapter folder nor a run folder with adapter/ in it")


def base_of(adapter: str) -> str | None:
    """The base model a run or adapter was trained from."""
    p = Path(adapter)
    for cfg in (p / "config.yaml", p.parent / "config.yaml"):
        if cfg.exists():
            import yaml

            return (yaml.safe_load(cfg.read_text()).get("model") or {}).get("name")
    meta = json.loads((resolve_adapter(adapter) / "adapter_config.json").read_text())
    return meta.get("base_model_name_or_path")
