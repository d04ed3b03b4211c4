"""`posttrain ppo`: PPO against a trained reward model, with actor, critic, reward and reference on one base.

prompts -> one base with three LoRA adapters (actor ``default`` trainable, ``critic`` trainable and started from the
reward adapter or zeros, ``reward`` frozen) and two heads (value, score) -> methods.ppo.PPO: per-token reward
-kl_coef (log pi_old - log pi_ref) plus the reward model's score on the last token, GAE(gamma, lambda) advantages
whitened per rollout, clipped surrogate + vf_coef * clipped value loss (see methods/ppo.py for the equations)
-> engine.train_loop -> adapter/ (the actor, a plain PEFT adapter), critic/, summary.json, rewards.svg.
With ppo.step_rewards (a `posttrain prm` run) a process reward model's step rewards join the per-token rewards on
the token that ends each step (methods.ppo.StepRewards).
Under torchrun each process samples and scores its share of the prompts, advantages are whitened over the whole
rollout (statistics summed over processes), gradients are all-reduced, and rank 0 writes.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from posttrain.config import PPOConfig
from posttrain.engine import console, train_loop
from posttrain.engine.resume import Resume
from posttrain.errors import ConfigError
from posttrain.io import atomic_dir
from posttrain.methods.ppo import (
    ACTOR,
    CRITIC,
    PPO,
    PPOParams,
    StepRewards,
    attach_roles,
    ppo_eval,
    ppo_schedule,
    role_memory,
)
from posttrain.models import Loaded, format_trainable, trainable_report
from posttrain.models.heads import save_head
from posttrain.models.loading import resolve_model_path
from posttrain.recipes._agent import agent_evaluate, agent_ppo_schedule, agent_setup
from posttrain.recipes._common import (
    announce,
    begin_run,
    disable_dropout,
    from_section,
    loop_options,
    prepare_model,
    rank0_after,
    save_config,
    write_summary,
)
from posttrain.recipes._prompts import check_processes, load_prompt_splits, start_engine
from posttrain.recipes._resume import check_resume
from posttrain.recipes.grpo import combined
from posttrain.report import write_watch_plot
from posttrain.rewards import load_prm
from posttrain.rollout.schedule import generation_batch
from posttrain.runs import ADAPTER_DIR, CONFIG_FILE, CRITIC_DIR, HEAD_FILE, run_config_of


def run(cfg: PPOConfig, *, resume: bool | Resume = False) -> dict[str, Any]:
    start = check_resume(cfg, resume)  # a changed config is refused here, before anything is loaded or written
    check_processes(cfg)
    setup = agent_setup(cfg) if cfg.env is not None else None  # a bad env stops the run before the model loads
    job = begin_run(cfg)
    rss_loaded = rss_mb()[0]
    tok = job.tokenizer
    d, p, t = cfg.data, cfg.ppo, cfg.train
    (prompts, rows, chats), (held_prompts, held_rows, held_chats), lines = load_prompt_splits(d, tok)
    announce("data", lines)
    watch = combined(cfg.watch)
    roles = build_roles(cfg, job.loaded)
    report = trainable_report(roles)
    report["numerics"] = job.loaded.numerics.as_dict() if job.loaded.numerics else None
    console.print(format_trainable(report))
    disable_dropout(roles, "PPO")
    memory = role_memory(roles)
    console.print(f"memory: one base {memory['base_weights_mb']} MB shared by actor, critic, "
                  f"{'reward and ' if setup is None else ''}reference ({memory['shared_weights_mb']} MB of weights "
                  f"in all; four copies: {memory['four_copies_weights_mb']} MB)")
    params = from_section(PPOParams, p)
    steps = step_rewards(cfg, roles, t.micro_batch_size)
    engine, correction = start_engine(cfg, roles.policy, tok, job.out, prompts[0], p.temperature)
    with contextlib.ExitStack() as stack:
        stack.callback(engine.close)
        if setup is not None:
            schedule = agent_ppo_schedule(cfg, setup, roles, tok, prompts, rows, chats, params, engine, job.out)
        else:
            schedule = ppo_schedule(roles, tok, prompts, rows, chats, params, prompts_per_step=p.prompts_per_step,
                                    mu=p.mu, micro_batch_size=t.micro_batch_size, seed=t.seed,
                                    chunk_size=t.loss_chunk_size, share_prompt=d.share_prompt, watch=watch,
                                    engine=engine, ahead=cfg.rollout.async_ahead, steps=steps)
        stack.callback(schedule.drain)
        total = t.max_steps or schedule.steps_for(t.epochs)
        schedule.total_rollouts = -(-total // p.mu)
        scorer = f"reward model {p.reward_model}" if setup is None else f"the {cfg.env.name} env's reward"
        console.print(f"training {total} steps: {p.prompts_per_step} prompts x {p.samples_per_prompt} "
                      f"{'' if setup is None else 'trajectories '}per rollout, {p.mu} step(s) per rollout, sampled "
                      f"by the {engine.name} engine; {scorer}" + (f", step rewards from {p.step_rewards}" if steps
                                                                   else ""))
        pad = schedule.pad_id
        if setup is not None:
            evaluate = agent_evaluate(cfg, setup, tok, held_rows, policy=lambda m: m.policy)
        else:
            evaluate = (lambda m: ppo_eval(m, tok, held_prompts, held_rows, held_chats, p.max_new_tokens,
                                           generation_batch(len(held_prompts), t.micro_batch_size), pad, watch,
                                           d.share_prompt)) if held_prompts else None

        def export(path: Path) -> None:  # a checkpoint: the actor as a plain PEFT adapter, the critic beside it
            roles.policy.save_pretrained(path, selected_adapters=[ACTOR])
            save_critic(roles, path.parent / CRITIC_DIR)

        save_config(job.out, cfg)
        opts = loop_options(t, total, cfg.model, job.loaded)
        records = train_loop(roles, PPO(params, t.loss_chunk_size, correction), schedule, opts,
                             job.out, evaluate=evaluate, export=export, resume=start)
    if not rank0_after(roles, sharded=False):  # rank 0 writes the results; the others hold the same weights
        return {}
    final = atomic_dir(job.out / ADAPTER_DIR, lambda tmp: (roles.policy.save_pretrained(tmp, selected_adapters=[ACTOR]),
                                                           tok.save_pretrained(tmp)))
    atomic_dir(job.out / CRITIC_DIR, lambda tmp: save_critic(roles, tmp))
    current, peak = rss_mb()
    memory.update(peak_rss_mb=round(peak, 1), rss_after_model_load_mb=round(rss_loaded, 1))
    summary, evals = write_summary(job, total, report, lines, records, final, "eval/reward", {"memory": memory})
    if evals:
        what = "reward-model score" if setup is None else "environment reward"
        console.print(f"held-out {what} (greedy) {evals[0]['eval/reward']:.3f} -> {evals[-1]['eval/reward']:.3f}")
    console.print(f"peak memory {peak:.0f} MB (after loading the model: {rss_loaded:.0f} MB); four separate copies "
                  f"would hold {memory['four_copies_weights_mb']} MB of weights alone")
    plot = write_watch_plot(job.out, f"PPO rewards: {job.out.name}")
    console.print(f"saved {final} (actor) and {job.out / CRITIC_DIR} (critic)"
                  + (f"; curves in {plot}" if plot else ""))
    return summary


def build_roles(cfg: PPOConfig, loaded: Loaded) -> Any:
    """The four roles on one base, from the reward run named by ``ppo.reward_model`` (checked to share the base);
    with an env, no reward model: actor, a fresh critic and the reference."""
    if cfg.ppo.reward_model is None:
        policy, _ = prepare_model(cfg, loaded)
        return attach_roles(policy, None, None, critic_from_reward=False)
    rm = Path(cfg.ppo.reward_model)
    if not (rm / HEAD_FILE).exists() or not (rm / CONFIG_FILE).exists():
        raise FileNotFoundError(f"ppo.reward_model: {rm} is not a `posttrain reward` run folder (needs config.yaml, "
                                f"adapter/ and {HEAD_FILE})")
    check_scorers(cfg)
    check_reward_base(cfg, run_config_of(str(rm)))
    policy, _ = prepare_model(cfg, loaded)
    return attach_roles(policy, rm / ADAPTER_DIR, rm / HEAD_FILE, critic_from_reward=cfg.ppo.critic_init == "reward")


# The scoring runs PPO reads, by method: the setting that takes each.
SCORER_KEYS = {"reward": "ppo.reward_model", "prm": "ppo.step_rewards"}


def check_scorers(cfg: PPOConfig) -> None:
    """A reward run scores an answer, a prm run each step: one given in the other's place is refused, naming both."""
    for method, key in SCORER_KEYS.items():
        path = getattr(cfg.ppo, key.split(".")[1])
        found = run_config_of(str(path)).get("method") if path else method
        if found != method:
            hint = f"; a {found} run goes in {SCORER_KEYS[found]}" if found in SCORER_KEYS else ""
            what = f"a {found} run" if found else "not a run folder (no config.yaml)"
            raise ConfigError(f"{key}: {path} is {what}; {key} takes a `posttrain {method}` run{hint}")


def step_rewards(cfg: PPOConfig, roles: Any, batch_size: int) -> StepRewards | None:
    """The process reward model of ppo.step_rewards (checked by build_roles), on the policy's device."""
    if not cfg.ppo.step_rewards:
        return None
    scorer = load_prm(cfg.ppo.step_rewards, device=str(next(roles.policy.parameters()).device))
    return from_section(StepRewards, cfg.ppo, scorer=scorer, batch_size=batch_size)


def check_reward_base(cfg: PPOConfig, rm_cfg: dict) -> None:
    """The reward adapter only means what it was trained to mean on the base it was trained on."""
    mine = (resolve_model_path(cfg.model.name), cfg.model.init_adapter or None)
    rm_model = rm_cfg.get("model") or {}
    theirs = (resolve_model_path(rm_model.get("name")), rm_model.get("init_adapter") or None)
    if mine != theirs or rm_cfg.get("finetune", "lora") != "lora":
        raise ConfigError(f"ppo.reward_model {cfg.ppo.reward_model} was trained from {theirs[0]} + adapter "
                          f"{theirs[1]} ({rm_cfg.get('finetune')}); this run's base is {mine[0]} + adapter {mine[1]}. "
                          "The four PPO roles share one base, so train the reward model with finetune: lora from the "
                          "same model.name and model.init_adapter")


def save_critic(roles: Any, path: Path) -> None:
    """A PEFT adapter folder for the critic, plus its value head."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    roles.policy.peft_config[CRITIC].save_pretrained(str(path))
    save_file(get_peft_model_state_dict(roles.policy, adapter_name=CRITIC), str(path / "adapter_model.safetensors"))
    save_head(roles.value_head, path / "value_head.safetensors")


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MB."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:
        current = int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20
    except OSError:
        current = float("nan")
    return current, peak

