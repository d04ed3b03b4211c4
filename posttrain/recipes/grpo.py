"""`posttrain grpo`: GRPO with verifiable rewards, from a base model or an SFT adapter (``model.init_adapter``).

What one optimizer step does, exactly:
1. Rollout: ``grpo.prompts_per_step`` prompts, ``grpo.group_size`` (G) completions each, sampled from the current
   policy at ``grpo.temperature`` / ``top_p``; each completion scored by the weighted ``rewards`` (``watch`` terms
   are scored and logged, never trained on).
2. Dynamic sampling (``grpo.dynamic_sampling: drop_equal``): groups whose rewards are all equal are dropped and
   more prompts drawn, up to ``grpo.max_draws`` draws (methods.grpo.GRPOBatches).
3. Advantage (``grpo.advantage``, losses.advantages): grpo A_i = (r_i - mean_group(r)) / (std_group(r) + 1e-6) with
   the sample std by default (``grpo.std``, as TRL and verl); dr_grpo, rloo, reinforce_pp(_baseline). The same A for
   every token of a completion; ``grpo.truncated: mask`` takes completions cut at max_new_tokens out of the loss.
4. Per-token loss (``grpo.policy_loss``, losses.policy): ppo_clip -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A),
   rho = exp(logp - logp_old) per token, or gspo with one length-normalised ratio per completion; optional dual
   clip; plus ``kl_coef`` * the KL estimate (``grpo.kl_estimator``, k3 by default, times rho by default) to the
   reference, the policy with its LoRA adapters disabled (no copy), or a frozen copy under full fine-tuning; none
   when kl_coef is 0. Log-probs are taken at the sampling temperature. Aggregation (``grpo.aggregation``,
   losses.reduce): grpo, dapo or dr_grpo; by default the advantage estimator's published one.
5. ``mu`` = 1: old = the current log-probs (detached), so rho = 1 and the clip never binds: one policy-gradient
   step per rollout. ``mu`` > 1: the rollout serves mu consecutive steps, old log-probs are fixed when it is
   sampled, rho drifts from 1 and the clip matters.
Under torchrun each process samples and scores its share of the prompt groups (rollout.schedule), gradients are
all-reduced, and rank 0 writes; the weights are replicated, never sharded (``check_processes``). Writes adapter/ or
model/, summary.json, rewards.svg, report.html.
"""

from __future__ import annotations

import contextlib
from typing import Any

from posttrain.config import GRPOConfig, RewardFnSpec
from posttrain.engine import console, train_loop
from posttrain.engine.resume import Resume
from posttrain.methods.grpo import GRPO, GRPOParams, grpo_eval, grpo_schedule
from posttrain.models.reference import make_reference
from posttrain.recipes._agent import agent_evaluate, agent_schedule, agent_setup
from posttrain.recipes._common import (
    announce,
    begin_run,
    disable_dropout,
    from_section,
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
from posttrain.report import write_watch_plot
from posttrain.rewards import Combined
from posttrain.rollout.schedule import generation_batch


def run(cfg: GRPOConfig, *, resume: bool | Resume = False) -> dict[str, Any]:
    start = check_resume(cfg, resume)  # a changed config is refused here, before anything is loaded or written
    check_processes(cfg)
    setup = agent_setup(cfg) if cfg.env is not None else None  # a bad env stops the run before the model loads
    job = begin_run(cfg)
    tok = job.tokenizer
    d, g, t = cfg.data, cfg.grpo, cfg.train
    (prompts, rows, chats), (held_prompts, held_rows, held_chats), lines = load_prompt_splits(d, tok)
    announce("data", lines)
    reward, watch = combined(cfg.rewards, cfg.reward_reduce), combined(cfg.watch)
    model, report = prepare_model(cfg, job.loaded)
    disable_dropout(model, "GRPO")
    params = from_section(GRPOParams, g)
    reference = make_reference(model, lora=cfg.finetune == "lora", per_token=True, temperature=g.temperature,
                               chunk_size=t.loss_chunk_size) if g.kl_coef > 0 else None
    engine, correction = start_engine(cfg, model, tok, job.out, prompts[0], g.temperature)
    with contextlib.ExitStack() as stack:
        stack.callback(engine.close)
        if setup is not None:
            schedule = agent_schedule(cfg, setup, model, tok, prompts, rows, chats, reward, params, reference, engine,
                                      job.out)
        else:
            schedule = grpo_schedule(model, tok, prompts, rows, chats, reward, params,
                                     prompts_per_step=g.prompts_per_step, mu=g.mu, micro_batch_size=t.micro_batch_size,
                                     seed=t.seed, reference=reference, top_p=g.top_p, chunk_size=t.loss_chunk_size,
                                     share_prompt=d.share_prompt, watch=watch, engine=engine,
                                     ahead=cfg.rollout.async_ahead)
        stack.callback(schedule.drain)
        total = t.max_steps or schedule.steps_for(t.epochs)
        schedule.total_rollouts = -(-total // g.mu)
        what = "completions" if setup is None else f"trajectories in the {cfg.env.name} env"
        console.print(f"training {total} steps: {g.prompts_per_step} prompts x {g.group_size} {what} per "
                      f"rollout, {g.mu} step(s) per rollout, sampled by the {engine.name} engine; reference: "
                      + ("none (kl_coef 0)" if reference is None else
                         "adapters disabled" if cfg.finetune == "lora" else "a frozen copy"))
        if setup is not None:
            evaluate = agent_evaluate(cfg, setup, tok, held_rows)
        else:
            evaluate = (lambda m: grpo_eval(m, tok, held_prompts, held_rows, held_chats, reward, g.max_new_tokens,
                                            generation_batch(len(held_prompts), t.micro_batch_size), watch)) \
                if held_prompts else None
        save_config(job.out, cfg)
        opts = loop_options(t, total, cfg.model, job.loaded)
        records = train_loop(model, GRPO(params, t.loss_chunk_size, correction), schedule, opts,
                             job.out, evaluate=evaluate, export=lora_export(cfg.finetune, model), resume=start)
    if not rank0_after(model, sharded=False):  # rank 0 writes the results; the others hold the same weights
        return {}
    final_dir = save_trained(model, tok, job.out, cfg.finetune)
    summary, evals = write_summary(job, total, report, lines, records, final_dir, "eval/reward")
    if evals:
        console.print(f"held-out reward (greedy) {evals[0]['eval/reward']:.3f} -> {evals[-1]['eval/reward']:.3f}")
    plot = write_watch_plot(job.out, f"GRPO rewards: {job.out.name}")
    console.print(f"saved {final_dir}" + (f"; curves in {plot}" if plot else ""))
    return summary


def combined(terms: list[RewardFnSpec], reduce: str = "sum") -> Combined | None:
    """The configured reward functions as one scorer (None when there are none)."""
    return Combined([(r.name, r.weight, r.options) for r in terms], reduce) if terms else None
