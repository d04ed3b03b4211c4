"""`posttrain dpo`: DPO, IPO, SimPO and RPO from a base model or an SFT adapter (``model.init_adapter``).

pairs -> LoRA or full model (dropout off: the step-0 loss must be ln 2) -> reference (none for a reference-free
loss | precomputed once | the policy with adapters disabled | a frozen copy) -> methods.dpo.PreferenceMethod with
losses.PREFERENCE_LOSSES[dpo.loss] -> engine.train_loop -> adapter/ or model/, summary.json, report.html.
Data parallel under torchrun (the batches split by rank; rank 0 writes the results).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from posttrain.config import DPOConfig, DPOSection
from posttrain.engine import console, train_loop
from posttrain.engine.resume import Resume
from posttrain.losses import PREFERENCE_LOSSES, PreferenceParams
from posttrain.methods.dpo import PreferenceMethod, precompute_reference, preference_eval
from posttrain.models import load_adapter, load_model
from posttrain.models.reference import Reference, make_reference
from posttrain.recipes._common import (
    Job,
    announce,
    begin_run,
    disable_dropout,
    from_section,
    load_base,
    loop_options,
    lora_export,
    prepare_model,
    rank0_after,
    save_config,
    save_trained,
    shard_if_asked,
    write_summary,
)
from posttrain.recipes._pairs import fixed_pair_batches, pair_training_schedule, prepare_pairs
from posttrain.recipes._resume import check_resume
from posttrain.runs import resolve_adapter


def run(cfg: DPOConfig, *, resume: bool | Resume = False) -> dict[str, Any]:
    start = check_resume(cfg, resume)  # a changed config is refused here, before anything is loaded or written
    job = begin_run(cfg)
    tok = job.tokenizer
    train, held, lines = prepare_pairs(cfg.data, tok)
    announce("data", lines)
    model, report = prepare_model(cfg, job.loaded)
    disable_dropout(model, "DPO")
    t, d = cfg.train, cfg.dpo
    held_batches = fixed_pair_batches(cfg, held, tok.pad_token_id) if held else []
    ref_train, ref_eval = build_reference(cfg, model, job, train, held, held_batches)
    params = preference_params(d)
    method = PreferenceMethod(d.loss, params, ref_train, t.loss_chunk_size)
    eval_method = PreferenceMethod(d.loss, params, ref_eval, t.loss_chunk_size)

    schedule, total = pair_training_schedule(cfg, train, tok.pad_token_id)
    console.print(f"training {total} steps: {len(train)} pairs in {len(schedule.units)} rows x "
                  f"{schedule.epochs_text(total, t.epochs)}, {schedule.per_step} rows per step "
                  f"({t.micro_batch_size} x {t.grad_accum} accumulation){schedule.repeat_warning()}")
    evaluate = (lambda m: preference_eval(m, eval_method, held_batches)) if held_batches else None
    save_config(job.out, cfg)
    sharded = shard_if_asked(cfg, model)
    records = train_loop(model, method, schedule, loop_options(t, total, cfg.model, job.loaded), job.out,
                         evaluate=evaluate, export=lora_export(cfg.finetune, model), resume=start)
    if not rank0_after(model, sharded):  # rank 0 writes the results; the others hold the same weights
        return {}
    final_dir = save_trained(model, tok, job.out, cfg.finetune)
    summary, evals = write_summary(job, total, report, lines, records, final_dir, "eval/accuracy")
    if evals:
        console.print(f"held-out preference accuracy {evals[0]['eval/accuracy']:.3f} -> "
                      f"{evals[-1]['eval/accuracy']:.3f}; loss {evals[0]['eval/loss']:.4f} -> "
                      f"{evals[-1]['eval/loss']:.4f}")
    console.print(f"saved {final_dir}")
    return summary


def preference_params(d: DPOSection) -> PreferenceParams:
    return from_section(PreferenceParams, d)


def build_reference(cfg: DPOConfig, model: torch.nn.Module, job: Job, train: list, held: list,
                    held_batches: list) -> tuple[Reference | None, Reference | None]:
    """The reference for training and for held-out evaluation, one of four, announced.

    None for a reference-free loss (SimPO). With ``dpo.precompute_ref`` one pass over every pair before the first
    step, stored in the run folder. Otherwise live: the policy with its adapters disabled (LoRA, no copy) or a
    frozen copy of the model (full fine-tuning)."""
    t, d = cfg.train, cfg.dpo
    if PREFERENCE_LOSSES[d.loss].reference_free:
        console.print(f"reference: none ({d.loss} is reference-free)")
        return None, None
    lora = cfg.finetune == "lora"
    if d.precompute_ref:
        # Before any step the policy is the reference (LoRA's B starts at zero), so one pass over the model
        # as it is now gives the reference log-probs, and no frozen copy is ever made.
        now = make_reference(model, lora=lora, chunk_size=t.loss_chunk_size, before_training=True)
        pad = job.tokenizer.pad_token_id
        with torch.no_grad():
            ref_train = precompute_reference(now, model, fixed_pair_batches(cfg, train, pad), len(train),
                                             job.out / "reference-train.pt")
            ref_eval = precompute_reference(now, model, held_batches, len(held), job.out / "reference-eval.pt") \
                if held else None
        console.print(f"reference: precomputed once for {len(train)} + {len(held)} pairs "
                      f"({job.out / 'reference-train.pt'})")
        return ref_train, ref_eval
    ref = make_reference(model, lora=lora, chunk_size=t.loss_chunk_size)
    console.print("reference: " + ("the policy with adapters disabled (no copy)" if lora else
                                  "a frozen copy of the model"))
    return ref, ref


def evaluate_run(cfg: DPOConfig, run_dir: Path) -> dict[str, Any]:
    """Held-out metrics of a finished dpo run: preference accuracy, implicit rewards, loss."""
    base = load_base(cfg.model)
    if cfg.model.init_adapter:
        base.model = load_adapter(base.model, str(resolve_adapter(cfg.model.init_adapter))).merge_and_unload()
    reference = make_reference(base.model, lora=cfg.finetune == "lora")  # a frozen copy before the trained weights
    if cfg.finetune == "lora":
        model = load_adapter(base.model, str(run_dir / "adapter"))
    else:
        model = load_model(str(run_dir / "model"), dtype=cfg.model.dtype, device=cfg.model.device).model
    _, held, _ = prepare_pairs(cfg.data, base.tokenizer)
    d = cfg.dpo
    method = PreferenceMethod(d.loss, preference_params(d), reference, cfg.train.loss_chunk_size)
    batches = fixed_pair_batches(cfg, held, base.tokenizer.pad_token_id)
    return {"run": str(run_dir), "pairs": len(held), **preference_eval(model, method, batches)}
