"""`posttrain online-dpo`: iterative DPO on the policy's own samples, judged or rewarded each round.

prompts -> LoRA or full model (dropout off) -> the rollout engine -> rounds (methods.online_dpo.OnlineRounds):
sample k completions per prompt, score them (``rewards``: a reward model or verifiable rewards; or
``online.judge``: a pairwise judge in both orders), keep best vs worst (ties and inconsistent verdicts dropped,
counted), reference log-probs once per round, rounds/round-RRR.jsonl, then ``online.steps_per_round`` DPO steps
(any loss of losses.PREFERENCE_LOSSES) -> engine.train_loop -> adapter/ or model/, summary.json (with a table of the
rounds), rewards.svg (the samples' scores per round beside the held-out metric), report.html.

Held-out (the over-optimisation watch): greedy answers to held-out prompts, scored by the same rewards (eval/reward)
or judged against the starting policy's greedy answers (eval/win_rate), plus the ``watch`` terms, never trained on.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

from posttrain.config import OnlineDPOConfig
from posttrain.engine import console, train_loop
from posttrain.engine.resume import Resume
from posttrain.io import atomic_write_text, read_json
from posttrain.judge.pairwise import CalibratedJudge, Judge, ModelJudge
from posttrain.losses import PREFERENCE_LOSSES
from posttrain.methods.grpo import grpo_eval
from posttrain.methods.online_dpo import (
    OUTCOMES,
    OnlinePreference,
    OnlineRounds,
    batch_reference,
    greedy_texts,
    judge_eval,
    pick_by_judge,
    pick_by_scores,
    prompt_text,
    read_round,
)
from posttrain.models.numerics import Numerics, autocast
from posttrain.models.reference import Reference, make_reference
from posttrain.recipes._common import (
    announce,
    begin_run,
    disable_dropout,
    load_base,
    loop_options,
    lora_export,
    prepare_model,
    rank0_after,
    save_config,
    save_trained,
    write_summary,
)
from posttrain.recipes._prompts import check_processes, load_prompt_splits, start_engine
from posttrain.recipes._resume import check_resume
from posttrain.recipes.dpo import preference_params
from posttrain.recipes.grpo import combined
from posttrain.report import write_online_plot
from posttrain.rollout.schedule import RolloutSchedule, generation_batch
from posttrain.runs import load_for_inference, resolve_adapter

ROUNDS = "rounds"  # in the run folder: round-RRR.jsonl, and eval-baseline.json with a judge


def run(cfg: OnlineDPOConfig, *, resume: bool | Resume = False) -> dict[str, Any]:
    start = check_resume(cfg, resume)  # a changed config is refused here, before anything is loaded or written
    check_processes(cfg)
    job = begin_run(cfg)
    tok = job.tokenizer
    d, o, t = cfg.data, cfg.online, cfg.train
    (prompts, rows, chats), (held_prompts, held_rows, held_chats), lines = load_prompt_splits(d, tok)
    announce("data", lines)
    folder = job.out / ROUNDS
    if not resume and folder.exists():  # a fresh run never trains on another run's pairs
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model, report = prepare_model(cfg, job.loaded)
    disable_dropout(model, "online DPO")
    reward, watch = combined(cfg.rewards, cfg.reward_reduce), combined(cfg.watch)
    judge = build_judge(cfg, model, tok) if o.judge else None
    reference = round_reference(cfg, model)
    method = OnlinePreference(cfg.dpo.loss, preference_params(cfg.dpo),
                              None if reference is None else batch_reference, t.loss_chunk_size)
    engine, _ = start_engine(cfg, model, tok, job.out, prompts[0], o.temperature)
    total = o.rounds * o.steps_per_round
    with contextlib.ExitStack() as stack:
        stack.callback(engine.close)
        sampler = RolloutSchedule(model, tok, prompts, rows, chats, make_batches=_unused,
                                  prompts_per_step=o.prompts_per_round, mu=o.steps_per_round,
                                  micro_batch_size=t.micro_batch_size, seed=t.seed, share_prompt=d.share_prompt,
                                  engine=engine)
        if judge is not None:
            j = o.judge
            pick = lambda i, texts, _: pick_by_judge(judge, prompt_text(chats[i]), texts, j.criterion,  # noqa: E731
                                                     j.margin)
        else:
            pick = lambda i, texts, scores: pick_by_scores(scores)  # noqa: E731
        schedule = OnlineRounds(sampler, pick, reward, reference, folder=folder, steps_per_round=o.steps_per_round,
                                samples=o.samples, micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum,
                                max_seq_len=d.max_prompt_len + o.max_new_tokens,
                                sampling=dict(max_new_tokens=o.max_new_tokens, temperature=o.temperature,
                                              top_p=o.top_p, min_new_tokens=0),
                                scorer=judge_name(cfg) if judge is not None else "rewards")
        console.print(f"training {total} steps: {o.rounds} rounds of {o.prompts_per_round} prompts x {o.samples} "
                      f"samples (best vs worst by {schedule.scorer}) then {o.steps_per_round} {cfg.dpo.loss} steps, "
                      f"sampled by the {engine.name} engine; reference: " + describe_reference(cfg))
        evaluate = held_out_eval(cfg, model, tok, judge, (held_prompts, held_rows, held_chats), reward, watch, folder,
                                 job.loaded.numerics)
        save_config(job.out, cfg)
        records = train_loop(model, method, schedule, loop_options(t, total, cfg.model, job.loaded), job.out,
                             evaluate=evaluate, export=lora_export(cfg.finetune, model), resume=start)
    if not rank0_after(model, sharded=False):  # rank 0 writes the results; the others hold the same weights
        return {}
    final_dir = save_trained(model, tok, job.out, cfg.finetune)
    table = rounds_table(folder, o.rounds)
    key = "eval/win_rate" if judge is not None else "eval/reward"
    summary, evals = write_summary(job, total, report, lines, records, final_dir, key, extra={"rounds": table})
    for r in table:
        console.print(f"round {r['round']}: kept {r['kept']} of {r['prompts']} (ties {r['tie']}, inconsistent "
                      f"{r['inconsistent']}, intransitive {r['intransitive']}); chosen {r['chosen_score']:.3f} vs "
                      f"rejected {r['rejected_score']:.3f}")
    if evals:
        console.print(f"held-out {key} {evals[0][key]:.3f} -> {evals[-1][key]:.3f}")
    plot = write_online_plot(job.out, f"online DPO: {job.out.name}", key)
    console.print(f"saved {final_dir}" + (f"; curves in {plot}" if plot else ""))
    return summary


def _unused(schedule: RolloutSchedule, rollout: int) -> list:
    raise AssertionError("OnlineRounds builds its own batches")  # the sampler only samples


def round_reference(cfg: OnlineDPOConfig, model: Any) -> Reference | None:
    """What computes a round's reference log-probs when the round starts: none for a reference-free loss; the
    starting policy (adapters off, or a frozen copy under full fine-tuning); or, each_round, the policy itself."""
    if PREFERENCE_LOSSES[cfg.dpo.loss].reference_free:
        return None
    lora, chunk = cfg.finetune == "lora", cfg.train.loss_chunk_size
    if cfg.online.reference == "each_round":
        return make_reference(model, lora=False, chunk_size=chunk, before_training=True)
    return make_reference(model, lora=lora, chunk_size=chunk)


def describe_reference(cfg: OnlineDPOConfig) -> str:
    if PREFERENCE_LOSSES[cfg.dpo.loss].reference_free:
        return f"none ({cfg.dpo.loss} is reference-free)"
    if cfg.online.reference == "each_round":
        return "the policy at the start of each round (computed once per round)"
    return "the starting policy, " + ("adapters disabled" if cfg.finetune == "lora" else "a frozen copy") + \
        " (computed once per round)"


class AdapterOffJudge(ModelJudge):
    """The policy with its LoRA adapters off as the judge: the starting weights, without a second copy."""

    def __call__(self, prompt: str, first: str, second: str, criterion: str) -> float:
        with self.model.disable_adapter():
            return super().__call__(prompt, first, second, criterion)


def judge_name(cfg: OnlineDPOConfig) -> str:
    j = cfg.online.judge
    name = j.model or f"{cfg.model.name or 'embedded'} (the starting policy)"
    return ("calibrated " if j.calibrated else "") + "judge " + name + (f" + {j.adapter}" if j.adapter else "")


def build_judge(cfg: OnlineDPOConfig, model: Any, tokenizer: Any) -> Judge:
    j = cfg.online.judge
    if j.model is None and j.adapter is None and cfg.finetune == "lora":
        judge: Judge = AdapterOffJudge(model, tokenizer, name="starting policy")
    elif j.model is None and j.adapter is None:  # full fine-tuning moves the weights: the judge needs its own copy
        loaded = load_base(cfg.model)
        if cfg.model.init_adapter:
            from posttrain.models import load_adapter

            loaded.model = load_adapter(loaded.model, str(resolve_adapter(cfg.model.init_adapter))).merge_and_unload()
        judge = ModelJudge(loaded.model.eval(), loaded.tokenizer, name="starting policy")
    else:
        loaded = load_for_inference(j.model, j.adapter)
        judge = ModelJudge(loaded.model, loaded.tokenizer, name=j.model or "judge")
    console.print(f"scorer: {judge_name(cfg)}, both orders" + (f", margin {j.margin}" if j.margin else ""))
    return CalibratedJudge(judge) if j.calibrated else judge


def held_out_eval(cfg: OnlineDPOConfig, model: Any, tok: Any, judge: Judge | None, held: tuple, reward: Any,
                  watch: Any, folder: Path, numerics: Numerics | None) -> Any:
    """The eval the loop runs: held-out rewards of greedy answers, or their win rate against the starting policy's
    (computed once, before any step, and kept in the run folder for a resumed run). The starting answers are
    generated under the loop's autocast, as every eval is, so the step-0 eval compares the start with itself."""
    prompts, rows, chats = held
    if not prompts:
        return None
    o, t = cfg.online, cfg.train
    batch = generation_batch(len(prompts), t.micro_batch_size)
    if judge is None:
        return lambda m: grpo_eval(m, tok, prompts, rows, chats, reward, o.max_new_tokens, batch, watch)
    path = folder / "eval-baseline.json"
    saved = read_json(path) if path.exists() else None
    if saved is None or saved.get("prompts") != [prompt_text(c) for c in chats]:
        with autocast(numerics, next(model.parameters()).device):  # before any step: the start
            texts = greedy_texts(model, tok, prompts, o.max_new_tokens, batch).texts
        atomic_write_text(path, json.dumps({"prompts": [prompt_text(c) for c in chats], "answers": texts}))
        saved = read_json(path)
    baseline = saved["answers"]
    return lambda m: judge_eval(m, tok, prompts, rows, chats, judge, o.judge.criterion, baseline,
                                margin=o.judge.margin, max_new_tokens=o.max_new_tokens, batch_size=batch, watch=watch)


def rounds_table(folder: Path, rounds: int) -> list[dict[str, Any]]:
    """One row per round written: its first step, prompts, outcome counts and mean scores (from its records)."""
    out = []
    for r in range(rounds):
        path = folder / f"round-{r:03d}.jsonl"
        if not path.exists():
            break
        recs = read_round(path)
        kept = [x for x in recs if x["outcome"] == "kept"]
        mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
        out.append({"round": r, "step": recs[0]["step"] if recs else None, "prompts": len(recs),
                    **{o: sum(x["outcome"] == o for x in recs) for o in OUTCOMES},
                    "sample_score": mean([s for x in recs for s in x["scores"]]),
                    "chosen_score": mean([x["scores"][x["chosen"]] for x in kept]),
                    "rejected_score": mean([x["scores"][x["rejected"]] for x in kept]),
                    "file": str(path)})
    return out
