"""Multi-turn PPO in an environment: per-token advantages over the tokens the model sampled.

Each row gets ``samples_per_prompt`` trajectories (``rollout.multiturn``), as in multi-turn GRPO. The rewards are
PPO's, on the sampled tokens only (derivations §7):

  r_t = -kl_coef * (log pi_old(a_t|s_t) - log pi_ref(a_t|s_t)) on every sampled token, plus the environment's
        reward (minus ``missing_eos_penalty`` for a trajectory cut by its token budget) on its last sampled token
  A_t = GAE(gamma, lambda) along the trajectory's sampled tokens, in order, across turns and split segments
        (``losses.rl.chained_gae``): the last token of a turn bootstraps from V at the first token of the next

Environment tokens (tool results, the template's framing) are context: they are out of ``completion_mask``, so they
get no advantage, no value target and no loss, and the critic is read only where the policy acted. The loss is
PPO's (``methods.ppo.PPO``), unchanged. There is no reward model: the environment scores, so the roles are actor,
critic (a fresh adapter, zero value head) and reference (adapters off).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from posttrain.losses.rl import chained_gae, kl_shaped_rewards, masked_mean, whiten
from posttrain.methods.agent import AgentSetup, sample_trajectories, sampled_only, samples
from posttrain.methods.ppo import PPOParams, SharedRoles, role_passes, rollout_moments, with_targets
from posttrain.models.forward import Batch
from posttrain.rollout.multiturn import Trajectory, trajectory_metrics
from posttrain.rollout.schedule import RolloutSchedule


def terminal_scores(trajs: list[Trajectory], owner: list[int], penalty: float) -> torch.Tensor:
    """(rows,) the score each training row carries on its last sampled token: its trajectory's reward (less
    ``penalty`` where the trajectory was cut) on the trajectory's last row, 0 on the rows before a split."""
    scores = torch.zeros(len(owner))
    last = {k: i for i, k in enumerate(owner)}
    for k, i in last.items():
        scores[i] = trajs[k].reward - (0.0 if trajs[k].finished else penalty)
    return scores


@dataclass(frozen=True, eq=False)
class AgentPPOBatches:
    """A ``RolloutSchedule``'s ``make_batches`` for multi-turn PPO (see the module docstring)."""

    roles: SharedRoles
    setup: AgentSetup
    params: PPOParams
    chunk_size: int = 1024
    record: Callable[[list[Trajectory], int], None] | None = None

    @torch.no_grad()
    def __call__(self, schedule: RolloutSchedule, rollout: int) -> list[Batch]:
        p = self.params
        idx, trajs, took = sample_trajectories(schedule, self.setup, rollout, p.samples_per_prompt, p.max_new_tokens,
                                               p.temperature, p.top_p)
        if self.record is not None:
            self.record(trajs, rollout)
        ro, owner, sampled = samples(trajs)
        batches = sampled_only(schedule.micro_batches(ro), sampled)
        mask, old, ref, values, _ = role_passes(self.roles, batches, p.temperature, self.chunk_size, score=False)
        rewards = kl_shaped_rewards(terminal_scores(trajs, owner, p.missing_eos_penalty), old, ref, mask, p.kl_coef)
        adv, returns = chained_gae(rewards, values, mask, owner, p.gamma, p.lam)
        if p.whiten_advantages:
            adv = whiten(adv, mask, moments=rollout_moments(adv, mask))
        env = torch.tensor([t.reward for t in trajs], dtype=torch.float64)
        finished = torch.tensor([t.finished for t in trajs])
        kl = masked_mean(old - ref, mask)
        metrics = {"reward": env.mean(), "reward_std": env.std(correction=0), "kl": kl.double(),
                   "non_score_reward": (-p.kl_coef * kl).double(),
                   "value_mean": masked_mean(values, mask).double(),
                   "return_mean": masked_mean(returns, mask).double(),
                   "completion_len": torch.tensor(sum(map(sum, sampled)) / len(trajs), dtype=torch.float64),
                   "truncated": 1.0 - finished.double().mean(),
                   "rollout/sample_s": torch.tensor(took, dtype=torch.float64),
                   **{k: torch.tensor(v, dtype=torch.float64) for k, v in trajectory_metrics(trajs).items()}}
        schedule.last_rollout = {"rollout": rollout, "prompts": idx, "texts": [t.answer for t in trajs],
                                 "rewards": env.tolist()}
        return with_targets(batches, old, values, adv, returns, metrics)
