"""`posttrain prm`: a process reward model, a backbone (LoRA or full) plus a scalar head read at every step's end.

rows of prompt / steps / labels -> data.steps: the steps joined into one assistant turn, the token holding each
step's last character found -> LoRA or full backbone -> models.heads.StepScoreModel (zero-initialised head: every
step starts at p = 0.5, the first loss exactly ln 2) -> methods.prm.ProcessBCE: per-step BCE with logits (soft labels
as targets; neutral steps skipped or counted as prm.neutral says) -> engine.train_loop, held-out step accuracy,
AUROC (with its standard error) and first-error accuracy -> adapter/ (or model/) + score_head.safetensors,
summary.json, report.html; loadable with posttrain.rewards.load_prm. Data parallel under torchrun.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from posttrain.config import PRMConfig, StepDataConfig
from posttrain.data import StepExample, build_steps, held_out, step_batches, step_schedule
from posttrain.data.templates import resolve_template
from posttrain.engine import console
from posttrain.engine.distributed import world
from posttrain.engine.resume import Resume
from posttrain.errors import DataError
from posttrain.methods.prm import ProcessBCE, prm_eval
from posttrain.models import trainable_report
from posttrain.models.heads import StepScoreModel
from posttrain.recipes._common import (
    announce,
    begin_run,
    prepare_model,
    train_scorer,
    write_summary,
)
from posttrain.recipes._resume import check_resume
from posttrain.rewards import load_prm
from posttrain.runs import HEAD_FILE


def prepare_steps(dcfg: StepDataConfig, separator: str, tokenizer: Any
                  ) -> tuple[list[StepExample], list[StepExample], list[str]]:
    """Train and held-out solutions and the data report lines."""
    kw = dict(separator=separator, max_seq_len=dcfg.max_seq_len, overlong=dcfg.overlong,
              system_prompt=dcfg.system_prompt, chat_template=resolve_template(dcfg.chat_template), limit=dcfg.limit)
    train, report = build_steps(dcfg.train, tokenizer, **kw)
    lines = [report.summary()]
    if dcfg.eval:
        held, eval_report = build_steps(dcfg.eval, tokenizer, **kw)
        lines.append(eval_report.summary())
        if dcfg.eval_limit and len(held) > dcfg.eval_limit:
            held = held[:dcfg.eval_limit]
            lines.append(f"held out the first {dcfg.eval_limit} of them (data.eval_limit)")
    else:
        train, held, split_lines = held_out(train, dcfg.eval_fraction, dcfg.split_seed, "rows", dcfg.eval_limit,
                                            groups=[e.question for e in train])
        lines += split_lines
    return train, held, lines


def eval_batches(cfg: PRMConfig, held: list[StepExample], pad_id: int) -> list[dict[str, Any]]:
    return step_batches(held, cfg.train.micro_batch_size, pad_id, cfg.data.max_seq_len if cfg.data.packing else None)


def run(cfg: PRMConfig, *, resume: bool | Resume = False) -> dict[str, Any]:
    start = check_resume(cfg, resume)  # a changed config is refused here, before anything is loaded or written
    job = begin_run(cfg)
    tok = job.tokenizer
    train, held, lines = prepare_steps(cfg.data, cfg.prm.step_separator, tok)
    announce("data", lines)
    if cfg.prm.neutral == "skip" and all(x is None for ex in train for x in ex.labels):
        raise DataError(cfg.data.train, None, "labels", "every training step is neutral (null) and prm.neutral is "
                        "skip: nothing is left to train on; set prm.neutral to positive or negative")
    lm, lm_report = prepare_model(cfg, job.loaded)
    model = StepScoreModel(lm)
    report = {**trainable_report(model), "base_weight_bytes": lm_report.get("base_weight_bytes"),
              "numerics": lm_report.get("numerics")}
    t = cfg.train
    method = ProcessBCE(cfg.prm.neutral)
    held_batches = eval_batches(cfg, held, tok.pad_token_id) if held else []
    w = world()
    schedule = step_schedule(train, micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum, seed=t.seed,
                             pad_id=tok.pad_token_id, packing=cfg.data.packing, max_seq_len=cfg.data.max_seq_len,
                             world_size=w.size, rank=w.rank)
    total = t.max_steps or schedule.steps_for(t.epochs)
    console.print(f"training {total} steps: {len(train)} solutions in {len(schedule.units)} rows x "
                  f"{schedule.epochs_text(total, t.epochs)}{schedule.repeat_warning()}")
    evaluate = (lambda m: prm_eval(m, method, held_batches)) if held_batches else None
    trained = train_scorer(cfg, job, lm, model, method, schedule, total, evaluate, start)
    if trained is None:
        return {}
    records, final_dir = trained
    summary, evals = write_summary(job, total, report, lines, records, job.out, "eval/auroc")
    if evals:
        first, last = evals[0], evals[-1]
        z = last["eval/auroc_z"]
        spread = f"se {last['eval/auroc_se']:.3f}" + (f", {z:+.1f} se from 0.5" if z == z else "")
        console.print(f"held-out step AUROC {first['eval/auroc']:.3f} -> {last['eval/auroc']:.3f} ({spread}); "
                      f"step accuracy {last['eval/step_accuracy']:.3f}; first error found "
                      f"{last['eval/first_error_accuracy']:.3f}, all-correct kept "
                      f"{last['eval/all_correct_accuracy']:.3f}")
    console.print(f"saved {final_dir} and {job.out / HEAD_FILE}")
    return summary


def evaluate_run(cfg: PRMConfig, run_dir: Path) -> dict[str, Any]:
    """Held-out metrics of a finished prm run: loss, step accuracy, AUROC, first-error accuracy."""
    prm = load_prm(run_dir, device=cfg.model.device, dtype=cfg.model.dtype)
    _, held, _ = prepare_steps(cfg.data, cfg.prm.step_separator, prm.tokenizer)
    if not held:
        raise DataError(cfg.data.train, None, None, "no held-out rows: set data.eval or data.eval_fraction")
    batches = eval_batches(cfg, held, prm.tokenizer.pad_token_id)
    return {"run": str(run_dir), "solutions": len(held), **prm_eval(prm.model, ProcessBCE(cfg.prm.neutral), batches)}
