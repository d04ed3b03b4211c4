"""`posttrain reward`: a Bradley-Terry reward model, a backbone (LoRA or full) plus a scalar score head.

pairs -> LoRA or full backbone -> models.heads.ScoreModel (zero-initialised head: the first loss is exactly ln 2)
-> methods.reward.RewardBT: -log sigmoid(s_chosen - s_rejected - margin + length_coef (len_c - len_r) / 100),
   the length term explaining away the part of a preference that length predicts -> engine.train_loop
-> adapter/ (or model/) + score_head.safetensors, summary.json, report.html; loadable with posttrain.rewards.
Data parallel under torchrun (the batches split by rank; rank 0 writes the results).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from posttrain.config import RewardConfig
from posttrain.engine import console
from posttrain.engine.resume import Resume
from posttrain.methods.reward import RewardBT, reward_eval
from posttrain.models import trainable_report
from posttrain.models.heads import ScoreModel
from posttrain.recipes._common import (
    announce,
    begin_run,
    prepare_model,
    train_scorer,
    write_summary,
)
from posttrain.recipes._pairs import fixed_pair_batches, pair_training_schedule, prepare_pairs
from posttrain.recipes._resume import check_resume
from posttrain.rewards import RewardModel
from posttrain.runs import HEAD_FILE


def run(cfg: RewardConfig, *, resume: bool | Resume = False) -> dict[str, Any]:
    start = check_resume(cfg, resume)  # a changed config is refused here, before anything is loaded or written
    job = begin_run(cfg)
    tok = job.tokenizer
    train, held, lines = prepare_pairs(cfg.data, tok)
    announce("data", lines)
    lm, lm_report = prepare_model(cfg, job.loaded)
    model = ScoreModel(lm)
    report = {**trainable_report(model), "base_weight_bytes": lm_report.get("base_weight_bytes"),
              "numerics": lm_report.get("numerics")}
    t, rc = cfg.train, cfg.reward
    method = RewardBT(rc.margin, rc.length_coef)
    held_batches = fixed_pair_batches(cfg, held, tok.pad_token_id) if held else []
    schedule, total = pair_training_schedule(cfg, train, tok.pad_token_id)
    console.print(f"training {total} steps: {len(train)} pairs in {len(schedule.units)} rows x "
                  f"{schedule.epochs_text(total, t.epochs)}{schedule.repeat_warning()}")
    evaluate = (lambda m: reward_eval(m, method, held_batches)) if held_batches else None
    trained = train_scorer(cfg, job, lm, model, method, schedule, total, evaluate, start)
    if trained is None:
        return {}
    records, final_dir = trained
    summary, evals = write_summary(job, total, report, lines, records, job.out, "eval/accuracy")
    if evals:
        last = evals[-1]
        console.print(f"held-out pairwise accuracy {evals[0]['eval/accuracy']:.3f} -> {last['eval/accuracy']:.3f}; "
                      f"scores chosen {last['eval/score_chosen']:.3f} vs rejected {last['eval/score_rejected']:.3f} "
                      f"(std {last['eval/score_std']:.3f}); corr(score, length) {last['eval/length_corr']:+.2f}")
        if abs(last["eval/length_corr"]) > rc.length_warn:
            console.print(f"[yellow]warning: the score follows response length (|corr| > {rc.length_warn}); "
                          "a policy can raise it by writing longer. Consider reward.length_coef.[/]")
    console.print(f"saved {final_dir} and {job.out / HEAD_FILE}")
    return summary


def evaluate_run(cfg: RewardConfig, run_dir: Path) -> dict[str, Any]:
    """Held-out metrics of a finished reward run: pairwise accuracy, score spread, loss."""
    rm = RewardModel(run_dir, device=cfg.model.device, dtype=cfg.model.dtype)
    _, held, _ = prepare_pairs(cfg.data, rm.tokenizer)
    batches = fixed_pair_batches(cfg, held, rm.tokenizer.pad_token_id)
    return {"run": str(run_dir), "pairs": len(held),
            **reward_eval(rm.model, RewardBT(cfg.reward.margin, cfg.reward.length_coef), batches)}
