"""Multi-turn GRPO in an environment: a group is G trajectories of the same row (``rollout.multiturn``), each
trajectory's reward is the environment's (plus any reward terms, scored on its final answer), and its group
advantage goes to every token the model sampled in it. Environment tokens (tool results, the template's framing)
sit in the sequence as context and carry no loss: they are masked out of ``completion_mask``, so the policy loss,
the KL, the entropy and the aggregation all count sampled tokens only. The loss itself is GRPO's
(``methods.grpo.GRPO``), unchanged.

A trajectory the template forced to split (``rollout.multiturn``) gives one training sample per segment, each with
the trajectory's advantage; a trajectory cut by the token budget counts as ``truncated`` (``grpo.truncated``).

Logged per rollout: ``agent/turns``, ``agent/tool_calls``, ``agent/tool_errors``, ``agent/timeouts``,
``agent/truncated`` (the environment's turn limit), ``agent/cut`` (a turn or the trajectory past its token
budget) and ``agent/splits``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from posttrain.losses.advantages import TRUNCATED, advantages
from posttrain.methods.grpo import GRPOParams, score_batches
from posttrain.models.forward import Batch
from posttrain.rollout.interface import HFEngine, Timer
from posttrain.rollout.multiturn import Trajectory, TurnSettings, run_trajectories, trajectory_metrics
from posttrain.rollout.sample import Rollout
from posttrain.rollout.schedule import RewardFn, RolloutSchedule, generation_batch, part_metrics


@dataclass(frozen=True)
class AgentSetup:
    """How trajectories are sampled: a fresh environment per trajectory, the template's tool-call style, the
    template (None: the tokenizer's), and the token budget of a whole trajectory."""
    make_env: Callable[[], Any]
    style: str
    chat_template: str | None
    max_tokens: int


def _answers_scored(reward: RewardFn | None, schedule: RolloutSchedule, idx: list[int], n: int,
                    trajs: list[Trajectory]) -> tuple[list[float], dict[str, list[float]]]:
    """The environment's rewards plus the reward terms on each trajectory's final answer, and the terms' parts."""
    env = [t.reward for t in trajs]
    if reward is None:
        return env, {}
    ro = Rollout([[] for _ in trajs], [[0] for _ in trajs], [t.answer for t in trajs], [t.finished for t in trajs],
                 [[] for _ in trajs])
    terms = schedule.score(reward, idx, n, ro)
    return [e + r for e, r in zip(env, terms)], {"env": env, **getattr(reward, "parts", {})}


def samples(trajs: list[Trajectory]) -> tuple[Rollout, list[int], list[list[bool]]]:
    """Every segment with a sampled token as one completion (its context as the prompt), the trajectory each came
    from, and which of its tokens were sampled."""
    prompt_ids, ids, logprobs, finished, owner, sampled = [], [], [], [], [], []
    for k, t in enumerate(trajs):
        for seg in t.segments:
            if not any(seg.sampled):
                continue
            prompt_ids.append(seg.prompt_ids)
            ids.append(seg.ids)
            logprobs.append(seg.logprobs)
            finished.append(t.finished)
            owner.append(k)
            sampled.append(seg.sampled)
    return Rollout(prompt_ids, ids, [""] * len(ids), finished, logprobs), owner, sampled


def sampled_only(batches: list[Batch], sampled: list[list[bool]]) -> list[Batch]:
    """The micro-batches of ``samples`` with environment tokens out of ``completion_mask``: they are context, so
    every loss, KL, entropy and count sees the model's sampled tokens only."""
    at = 0
    for b in batches:
        mask = b["completion_mask"]
        for i, flags in enumerate(sampled[at:at + mask.shape[0]]):
            mask[i, :len(flags)] &= torch.tensor(flags)
        at += mask.shape[0]
    return batches


def sample_trajectories(schedule: RolloutSchedule, setup: AgentSetup, rollout: int, n: int, max_new_tokens: int,
                        temperature: float, top_p: float) -> tuple[list[int], list[Trajectory], float]:
    """This process's share of the rollout's rows, ``n`` trajectories of each (the engine synced to the policy
    first), and the seconds sampling took."""
    idx, seeds = schedule.share(rollout)
    with Timer() as took:
        schedule.engine.sync(schedule.model, rollout)
        settings = TurnSettings(max_new_tokens, setup.max_tokens, temperature, top_p,
                                generation_batch(len(idx) * n, schedule.micro))
        trajs = run_trajectories(schedule.engine, schedule.tok, setup.make_env, [schedule.rows[i] for i in idx], idx,
                                 seeds, n, settings, style=setup.style, chat_template=setup.chat_template)
    return idx, trajs, took.s


@dataclass(frozen=True, eq=False)
class AgentBatches:
    """A ``RolloutSchedule``'s ``make_batches`` for multi-turn GRPO (see the module docstring)."""

    setup: AgentSetup
    params: GRPOParams
    reference: Callable[[torch.nn.Module, Batch], torch.Tensor] | None
    reward: RewardFn | None = None
    top_p: float = 1.0
    chunk_size: int = 1024
    record: Callable[[list[Trajectory], int], None] | None = None  # e.g. append them to trajectories.jsonl

    def __call__(self, schedule: RolloutSchedule, rollout: int) -> list[Batch]:
        p, g = self.params, self.params.group_size
        idx, trajs, took = sample_trajectories(schedule, self.setup, rollout, g, p.max_new_tokens, p.temperature,
                                               self.top_p)
        if self.record is not None:
            self.record(trajs, rollout)
        scores, parts = _answers_scored(self.reward, schedule, idx, g, trajs)
        rewards = torch.tensor(scores, dtype=torch.float64)
        adv = schedule.share_of(advantages(p.advantage, schedule.gather(rewards), g, p.std))
        ro, owner, sampled = samples(trajs)
        finished = torch.tensor([t.finished for t in trajs])
        row_weight = TRUNCATED[p.truncated](finished)[owner]
        metrics = {"reward": rewards.mean(), "reward_std": rewards.reshape(-1, g).std(1, correction=0).mean(),
                   "completion_len": torch.tensor(sum(sum(x) for x in sampled) / len(trajs), dtype=torch.float64),
                   "truncated": 1.0 - finished.double().mean(),
                   "rollout/sample_s": torch.tensor(took, dtype=torch.float64),
                   **{k: torch.tensor(v, dtype=torch.float64) for k, v in trajectory_metrics(trajs).items()},
                   **part_metrics(parts, "reward")}
        schedule.last_rollout = {"rollout": rollout, "prompts": idx, "texts": [t.answer for t in trajs],
                                 "rewards": scores}
        batches = sampled_only(schedule.micro_batches(ro), sampled)
        return score_batches(schedule, batches, adv[owner], row_weight, metrics, p, self.reference, self.chunk_size)


@torch.no_grad()
def agent_eval(model: torch.nn.Module, tokenizer, rows: list[dict[str, Any]], setup: AgentSetup,
               max_new_tokens: int, batch_size: int = 16, prefix: str = "eval") -> dict[str, float]:
    """One greedy trajectory per held-out row: the mean environment reward (``eval/reward``: the answer accuracy
    under a 0/1 verifier) and the trajectory counts."""
    if not rows:
        return {}
    settings = TurnSettings(max_new_tokens, setup.max_tokens, 0.0, 1.0, batch_size)
    trajs = run_trajectories(HFEngine(model, tokenizer), tokenizer, setup.make_env, rows, list(range(len(rows))),
                             list(range(len(rows))), 1, settings, style=setup.style, chat_template=setup.chat_template)
    out = {f"{prefix}/reward": sum(t.reward for t in trajs) / len(trajs)}
    out.update({f"{prefix}/{k.split('/', 1)[1]}": v for k, v in trajectory_metrics(trajs).items()})
    return out
