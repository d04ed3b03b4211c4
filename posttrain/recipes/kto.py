"""`posttrain kto`: KTO (Ethayarajh et al. 2024) on unpaired rows, from a base model or an SFT adapter.

unpaired rows (``data.build_unpaired``; ``posttrain data unpair`` writes them from pairs) -> class weights (given, or
``data.suggested_weights`` of the training rows' counts) -> LoRA or full model (dropout off: at step 0 every reward
is 0) -> reference (the policy with adapters disabled | a frozen copy) -> methods.kto.KTOMethod -> engine.train_loop
-> adapter/ or model/, summary.json (with the weights), report.html.
Data parallel under torchrun (the batches split by rank; z0 per micro-batch, see methods.kto; rank 0 writes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from posttrain.config import KTOConfig, KTOSection, UnpairedDataConfig
from posttrain.data import Unpaired, build_unpaired, held_out, suggested_weights
from posttrain.data.templates import resolve_template
from posttrain.data.unpaired import WEIGHT_RATIO_RANGE
from posttrain.engine import console, train_loop
from posttrain.engine.distributed import world
from posttrain.engine.resume import Resume
from posttrain.errors import ConfigError
from posttrain.methods.kto import KTOMethod, KTOParams, kto_batches, kto_eval, kto_schedule
from posttrain.models import load_adapter, load_model
from posttrain.models.reference import make_reference
from posttrain.recipes._common import (
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
from posttrain.recipes._resume import check_resume
from posttrain.runs import resolve_adapter


def run(cfg: KTOConfig, *, resume: bool | Resume = False) -> dict[str, Any]:
    start = check_resume(cfg, resume)  # a changed config is refused here, before anything is loaded or written
    job = begin_run(cfg)
    tok = job.tokenizer
    train, held, lines, warnings = prepare_unpaired(cfg.data, tok)
    announce("data", lines)
    for note in warnings:
        console.print(f"[yellow]warning: {note}")
    params, weights = kto_params(cfg.kto, train)
    console.print(weights["line"])
    model, report = prepare_model(cfg, job.loaded)
    disable_dropout(model, "KTO")
    t = cfg.train
    lora = cfg.finetune == "lora"
    reference = make_reference(model, lora=lora, per_token=True, chunk_size=t.loss_chunk_size)
    console.print("reference: " + ("the policy with adapters disabled (no copy)" if lora else
                                  "a frozen copy of the model"))
    method = KTOMethod(params, reference, t.loss_chunk_size)
    pad = tok.pad_token_id
    held_batches = kto_batches(held, t.micro_batch_size, pad, cfg.data.max_seq_len) if held else []
    w = world()
    schedule = kto_schedule(train, micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum, seed=t.seed,
                            pad_id=pad, max_seq_len=cfg.data.max_seq_len, world_size=w.size, rank=w.rank)
    total = t.max_steps or schedule.steps_for(t.epochs)
    console.print(f"training {total} steps: {len(train)} rows x {schedule.epochs_text(total, t.epochs)}, "
                  f"{schedule.per_step} rows per step ({t.micro_batch_size} x {t.grad_accum} accumulation"
                  f"{f' x {w.size} processes' if w.size > 1 else ''}; z0 from each micro-batch of "
                  f"{t.micro_batch_size}){schedule.repeat_warning()}")
    evaluate = (lambda m: kto_eval(m, method, held_batches)) if held_batches else None
    save_config(job.out, cfg)
    sharded = shard_if_asked(cfg, model)
    records = train_loop(model, method, schedule, loop_options(t, total, cfg.model, job.loaded), job.out,
                         evaluate=evaluate, export=lora_export(cfg.finetune, model), resume=start)
    if not rank0_after(model, sharded):  # rank 0 writes the results; the others hold the same weights
        return {}
    final_dir = save_trained(model, tok, job.out, cfg.finetune)
    saved = {k: v for k, v in weights.items() if k != "line"}
    summary, evals = write_summary(job, total, report, lines + warnings, records, final_dir, "eval/accuracy",
                                   extra={"kto_weights": saved})
    if evals:
        console.print(f"held-out sign agreement {evals[0]['eval/accuracy']:.3f} -> {evals[-1]['eval/accuracy']:.3f}; "
                      f"loss {evals[0]['eval/loss']:.4f} -> {evals[-1]['eval/loss']:.4f}")
    console.print(f"saved {final_dir}")
    return summary


def _prompt_key(row: Unpaired) -> str:
    return json.dumps(row.prompt, sort_keys=True)


def prepare_unpaired(dcfg: UnpairedDataConfig,
                     tokenizer: Any) -> tuple[list[Unpaired], list[Unpaired], list[str], list[str]]:
    """Train and held-out rows (each list indexed from 0), report lines, and warnings (a class under
    ``data.unpaired.MINORITY_SHARE`` of a file's rows).

    Without ``data.eval`` the split draws whole prompts: ``posttrain data unpair`` writes a pair's chosen and
    rejected response as two rows of one prompt, and a prompt on both sides would let the held-out rows be
    answered from training."""
    kw = dict(max_seq_len=dcfg.max_seq_len, overlong=dcfg.overlong, system_prompt=dcfg.system_prompt,
              chat_template=resolve_template(dcfg.chat_template), limit=dcfg.limit)
    train, report = build_unpaired(dcfg.train, tokenizer, **kw)
    lines, warnings = [report.summary()], [report.imbalance] if report.imbalance else []
    if dcfg.eval:
        held, eval_report = build_unpaired(dcfg.eval, tokenizer, **kw)
        lines.append(eval_report.summary())
    else:
        train, held, split_lines = held_out(train, dcfg.eval_fraction, dcfg.split_seed, "rows",
                                            groups=[_prompt_key(r) for r in train])
        lines += split_lines
    if len(train) < 2:
        raise ConfigError(f"data.train: {len(train)} training row(s) left; KTO needs at least 2 (its reference "
                          "point pairs each prompt with another row's completion)")
    if len(held) == 1:
        raise ConfigError("the held-out set has 1 row; KTO's held-out reference point needs at least 2: hold out "
                          "more (data.eval_fraction, data.eval) or none (data.eval_fraction: 0)")
    for rows in (train, held):
        for i, r in enumerate(rows):
            r.index = i
    return train, held, lines, warnings


def kto_params(k: KTOSection, train: list[Unpaired]) -> tuple[KTOParams, dict[str, Any]]:
    """The loss settings and the class weights used, with where they came from (kept in summary.json) and the
    line that says so. Both weights null: ``suggested_weights`` of the training rows' class counts; one set: the
    other is 1, TRL's default."""
    n_d = sum(r.label for r in train)
    n_u = len(train) - n_d
    if k.desirable_weight is None and k.undesirable_weight is None:
        d_w, u_w = suggested_weights(n_d, n_u)
        source = "suggested"
    else:
        d_w = 1.0 if k.desirable_weight is None else k.desirable_weight
        u_w = 1.0 if k.undesirable_weight is None else k.undesirable_weight
        source = "given"
    ratio = d_w * n_d / (u_w * n_u) if n_d and n_u else None
    low, high = WEIGHT_RATIO_RANGE
    if ratio is None:
        advice = f"; only {'desirable' if n_d else 'undesirable'} rows: KTO pushes one side only"
    else:
        advice = f"; lambda_D*n_D/(lambda_U*n_U) = {ratio:.3g}" + \
            ("" if low - 1e-9 <= ratio <= high + 1e-9 else f", outside the paper's [{low:g}, {high:.3g}]")
    line = (f"kto weights: desirable_weight={d_w:.4g}, undesirable_weight={u_w:.4g} ({source}; {n_d} desirable "
            f"and {n_u} undesirable training rows{advice})")
    weights = {"desirable_weight": d_w, "undesirable_weight": u_w, "source": source, "train_desirable": n_d,
               "train_undesirable": n_u, "ratio": ratio, "line": line}
    return from_section(KTOParams, k, desirable_weight=d_w, undesirable_weight=u_w), weights


def evaluate_run(cfg: KTOConfig, run_dir: Path) -> dict[str, Any]:
    """Held-out metrics of a finished kto run: each class's mean reward, their margin, sign agreement, loss."""
    base = load_base(cfg.model)
    if cfg.model.init_adapter:
        base.model = load_adapter(base.model, str(resolve_adapter(cfg.model.init_adapter))).merge_and_unload()
    lora = cfg.finetune == "lora"
    # A frozen copy before the trained weights arrive (full); LoRA's reference is the loaded adapter switched off.
    reference = make_reference(base.model, lora=lora, per_token=True, chunk_size=cfg.train.loss_chunk_size)
    if lora:
        model = load_adapter(base.model, str(run_dir / "adapter"))
    else:
        model = load_model(str(run_dir / "model"), dtype=cfg.model.dtype, device=cfg.model.device).model
    train, held, _, _ = prepare_unpaired(cfg.data, base.tokenizer)
    if not held:
        raise ConfigError("no held-out rows to evaluate on (data.eval or data.eval_fraction)")
    params, _ = kto_params(cfg.kto, train)  # the weights the run trained with: the same rows give the same counts
    method = KTOMethod(params, reference, cfg.train.loss_chunk_size)
    batches = kto_batches(held, cfg.train.micro_batch_size, base.tokenizer.pad_token_id, cfg.data.max_seq_len)
    return {"run": str(run_dir), "rows": len(held), **kto_eval(model, method, batches)}
