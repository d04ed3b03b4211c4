"""GRPO and PPO in an environment (``env`` in a grpo or ppo config): the environment built and checked before any
model loads, the template's tool-call style, the multi-turn rollout schedules, their held-out eval, and every
rollout's trajectories written to ``trajectories/rollout-NNNNNN.jsonl`` in the run folder (``posttrain render
--trajectory`` prints them). Layer 7, like the recipes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from posttrain.config import GRPOConfig, PPOConfig
from posttrain.data.templates import resolve_template
from posttrain.data.toolcalls import template_style
from posttrain.engine.distributed import world
from posttrain.envs import make_environment
from posttrain.errors import ConfigError, TemplateError
from posttrain.io import atomic_write_text
from posttrain.methods.agent import AgentBatches, AgentSetup, agent_eval
from posttrain.methods.agent_ppo import AgentPPOBatches
from posttrain.methods.grpo import GRPOParams
from posttrain.models.loading import load_tokenizer
from posttrain.rewards import Combined
from posttrain.rollout.multiturn import Trajectory, trajectory_record
from posttrain.rollout.schedule import RolloutSchedule, generation_batch


def agent_setup(cfg: GRPOConfig | PPOConfig) -> AgentSetup:
    """The environment factory (one instance built now, so a bad option stops the run here) and the template."""
    assert cfg.env is not None
    try:
        make_env = make_environment(cfg.env.name, cfg.env.options)
        tools = make_env().tools
    except ValueError as exc:
        raise ConfigError(f"env: {exc}") from None
    template = resolve_template(cfg.data.chat_template)
    style = None
    if tools:
        try:
            style = template_style(template or load_tokenizer(cfg.model.name).chat_template or "")
        except TemplateError as exc:
            raise ConfigError(f"data.chat_template: {exc}; the env gives the model tools, so the template must "
                              "render tool calls (e.g. data.chat_template: hermes-tools)") from None
    return AgentSetup(make_env, style, template, cfg.env.max_tokens)


def trajectory_writer(out: Path) -> Callable[[list[Trajectory], int], None]:
    def write(trajs: list[Trajectory], rollout: int) -> None:
        if world().rank:
            return
        lines = [json.dumps(trajectory_record(t, rollout), ensure_ascii=False) for t in trajs]
        atomic_write_text(out / "trajectories" / f"rollout-{rollout:06d}.jsonl", "\n".join(lines) + "\n")
    return write


def agent_schedule(cfg: GRPOConfig, setup: AgentSetup, model: Any, tokenizer: Any, prompts: Any, rows: Any,
                   chats: Any, reward: Combined | None, params: GRPOParams, reference: Any, engine: Any,
                   out: Path) -> RolloutSchedule:
    g, t = cfg.grpo, cfg.train
    batches = AgentBatches(setup, params, reference, reward, g.top_p, t.loss_chunk_size, trajectory_writer(out))
    return RolloutSchedule(model, tokenizer, prompts, rows, chats, make_batches=batches,
                           prompts_per_step=g.prompts_per_step, mu=g.mu, micro_batch_size=t.micro_batch_size,
                           seed=t.seed, share_prompt=cfg.data.share_prompt, engine=engine)


def agent_ppo_schedule(cfg: PPOConfig, setup: AgentSetup, roles: Any, tokenizer: Any, prompts: Any, rows: Any,
                       chats: Any, params: Any, engine: Any, out: Path) -> RolloutSchedule:
    p, t = cfg.ppo, cfg.train
    batches = AgentPPOBatches(roles, setup, params, t.loss_chunk_size, trajectory_writer(out))
    return RolloutSchedule(roles.policy, tokenizer, prompts, rows, chats, make_batches=batches,
                           prompts_per_step=p.prompts_per_step, mu=p.mu, micro_batch_size=t.micro_batch_size,
                           seed=t.seed, share_prompt=cfg.data.share_prompt, engine=engine)


def agent_evaluate(cfg: GRPOConfig | PPOConfig, setup: AgentSetup, tokenizer: Any, held_rows: list[dict[str, Any]],
                   policy: Callable[[Any], Any] = lambda m: m) -> Callable[[Any], dict[str, float]] | None:
    """The held-out eval: one greedy trajectory per row, of ``policy(model)`` (PPO's roles hold the actor)."""
    if not held_rows:
        return None
    batch = generation_batch(len(held_rows), cfg.train.micro_batch_size)
    section = cfg.grpo if isinstance(cfg, GRPOConfig) else cfg.ppo
    return lambda m: agent_eval(policy(m), tokenizer, held_rows, setup, section.max_new_tokens, batch)
