"""PPO for language models with four roles on one frozen base.

Actor (LoRA adapter ``default``), critic (adapter ``critic`` + value head), reward model (adapter ``reward`` +
score head, from a ``posttrain reward`` run) and reference (all adapters off) are one set of base weights in
memory; a role is a switch of the active adapter. Per rollout (derivations §7; Ouyang et al. 2022):

  r_t = -kl_coef * (log pi_old(a_t|s_t) - log pi_ref(a_t|s_t)),  plus the reward model's score on the last token
        (with ``ppo.step_rewards``, plus step_reward_coef * a process reward model's step reward on the token that
        ends each step: ``StepRewards``)
  A_t = GAE(gamma, lambda) over r_t and the critic's V(s_t);  returns R_t = A_t + V(s_t);  A whitened per rollout
  loss = clipped surrogate(A) + vf_coef * clipped value loss(V, R)

V(s_t) is read where token t is predicted (the hidden state of the token before it), the score at the
completion's own last token (as the reward model was trained to read it). ``ppo_schedule`` is the engine's batch
schedule (``rollout.schedule.RolloutSchedule`` with ``PPOBatches``): it samples, scores and collates each rollout.

Every step logs ``entropy`` as GRPO does: the mean over completion tokens of the actor's exact entropy at that token
(detached, from the same chunked log-softmax as the policy loss, no extra forward), the signal of entropy collapse.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from posttrain.data.collate import collate_rollouts
from posttrain.engine.distributed import sum_over_ranks
from posttrain.losses.offpolicy import Correction, corrected
from posttrain.losses.policy import ppo_clip_loss
from posttrain.losses.rl import (
    STEP_REWARDS,
    clipped_value_loss,
    gae,
    kl_shaped_rewards,
    masked_mean,
    step_shaped_rewards,
    whiten,
)
from posttrain.models.forward import Batch, evaluating, pair_hidden, scatter_tokens, token_logps, token_logps_entropy
from posttrain.models.heads import load_head
from posttrain.rewards.process import StepScorer, completion_steps, score_solutions
from posttrain.rollout.interface import RolloutEngine
from posttrain.rollout.sample import sample_completions
from posttrain.rollout.schedule import RewardFn, RolloutSchedule, mean_scores

ACTOR, CRITIC, REWARD = "default", "critic", "reward"


class SharedRoles(torch.nn.Module):
    """A PEFT model holding the actor, critic and reward adapters, plus the value and score heads."""

    def __init__(self, policy: torch.nn.Module, value_head: torch.nn.Linear, score_head: torch.nn.Linear | None):
        super().__init__()
        self.policy, self.value_head, self.score_head = policy, value_head, score_head
        if score_head is not None:  # None: an environment gives the reward, there is no reward model
            score_head.requires_grad_(False)

    @contextlib.contextmanager
    def _trainable_kept(self) -> Iterator[None]:
        """PEFT's set_adapter and disable_adapter flip requires_grad (only the active adapter trainable); the
        trainable set is restored afterwards so actor and critic both stay in the optimizer."""
        flags = [(p, p.requires_grad) for p in self.policy.parameters()]
        try:
            yield
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)

    @contextlib.contextmanager
    def role(self, name: str) -> Iterator[torch.nn.Module]:
        """Adapter ``name`` active for the duration; the actor afterwards."""
        with self._trainable_kept():
            self.policy.set_adapter(name)
            try:
                yield self.policy
            finally:
                self.policy.set_adapter(ACTOR)

    def logps(self, batch: Batch, temperature: float, chunk_size: int = 1024) -> torch.Tensor:
        """(N, L) actor log-probs of the sampled tokens."""
        return token_logps(self.policy, batch, temperature, chunk_size)

    def logps_entropy(self, batch: Batch, temperature: float, chunk_size: int = 1024
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """``logps`` and the (N, L) detached entropy of the actor's sampling distribution at each completion token,
        from the same forward (the loss's forward, so the metric costs no extra pass)."""
        return token_logps_entropy(self.policy, batch, temperature, chunk_size)

    def ref_logps(self, batch: Batch, temperature: float, chunk_size: int = 1024) -> torch.Tensor:
        with self._trainable_kept(), self.policy.disable_adapter():
            return token_logps(self.policy, batch, temperature, chunk_size)

    def values(self, batch: Batch) -> torch.Tensor:
        """(N, L) critic values V(s_t), read at the position that predicts token t."""
        with self.role(CRITIC) as m:
            hidden = pair_hidden(m, batch, decoder_only=True)
        src = batch["score_index"].to(hidden.device)
        return scatter_tokens(self.value_head(hidden[src]).squeeze(-1).float(), batch)

    def scores(self, batch: Batch) -> torch.Tensor:
        """(N,) reward-model scores, read at each completion's last token."""
        assert self.score_head is not None, "no reward model: the roles were attached without one"
        with self.role(REWARD) as m:
            hidden = pair_hidden(m, batch, decoder_only=True)
        return self.score_head(hidden[batch["last_index"].to(hidden.device)]).squeeze(-1).float()


def attach_roles(policy: torch.nn.Module, reward_adapter: str | Path | None, score_head: str | Path | None, *,
                 critic_from_reward: bool) -> SharedRoles:
    """The four roles on ``policy`` (a PEFT model whose adapter ``default`` is the actor): the reward run's adapter
    as ``reward`` (frozen) and as the critic's start (``critic``, trainable) when ``critic_from_reward``, else a
    fresh critic adapter like the actor's; the score head from ``score_head``, the value head a copy of it (or
    zeros). Only the actor's and critic's LoRA weights train. Without a reward model (``reward_adapter`` None: an
    environment rewards the policy) there are three roles, the critic fresh."""
    if reward_adapter is not None:
        policy.load_adapter(str(reward_adapter), adapter_name=REWARD, is_trainable=False)
    if critic_from_reward and reward_adapter is not None:
        policy.load_adapter(str(reward_adapter), adapter_name=CRITIC, is_trainable=True)
    else:
        policy.add_adapter(CRITIC, policy.peft_config[ACTOR])
    policy.set_adapter(ACTOR)
    for name, p in policy.named_parameters():  # actor and critic adapters train; the base and the reward do not
        p.requires_grad_("lora_" in name and (f".{ACTOR}." in name or f".{CRITIC}." in name))
    param = next(policy.parameters())
    score = load_head(score_head, param.dtype, param.device) if score_head is not None else None
    width = score.in_features if score is not None else policy.config.hidden_size
    value = torch.nn.Linear(width, 1, dtype=param.dtype, device=param.device)
    if critic_from_reward and score is not None:
        value.load_state_dict(score.state_dict())
    else:
        torch.nn.init.zeros_(value.weight)
        torch.nn.init.zeros_(value.bias)
    return SharedRoles(policy, value, score)


def role_memory(roles: SharedRoles) -> dict[str, float]:
    """Bytes of the shared base, of each adapter and head, and the weights four separate copies would hold."""
    base = sum(p.numel() * p.element_size() for n, p in roles.policy.named_parameters() if "lora_" not in n)
    adapters: dict[str, int] = {}
    for n, p in roles.policy.named_parameters():
        if "lora_" in n:
            role = n.split(".")[-2]
            adapters[role] = adapters.get(role, 0) + p.numel() * p.element_size()
    heads = sum(p.numel() * p.element_size() for m in (roles.value_head, roles.score_head) if m is not None
                for p in m.parameters())
    mb = 2 ** 20
    shared = base + sum(adapters.values()) + heads
    four = 4 * base + adapters.get(ACTOR, 0) + adapters.get(CRITIC, 0) + heads
    return {"base_weights_mb": round(base / mb, 1),
            **{f"adapter_{k}_mb": round(v / mb, 1) for k, v in adapters.items()},
            "heads_mb": round(heads / mb, 3), "shared_weights_mb": round(shared / mb, 1),
            "four_copies_weights_mb": round(four / mb, 1)}


@dataclass
class PPOParams:
    """PPO's settings; no defaults here: a run takes them from ``posttrain.config.PPOSection``, where each default
    is declared once (``recipes._common.from_section``)."""
    samples_per_prompt: int
    max_new_tokens: int
    min_new_tokens: int
    temperature: float
    top_p: float
    kl_coef: float
    gamma: float
    lam: float
    clip_eps: float
    value_clip: float
    vf_coef: float
    whiten_advantages: bool
    missing_eos_penalty: float


class PPO:
    """The loss of one micro-batch of scored rollouts: clipped policy loss plus the weighted clipped value loss,
    summed over completion tokens (the loop divides by the step's token count). With the rollout engine's log-probs
    in the batch, the mismatch is logged and a ``correction`` importance-weights the policy loss (the value loss
    regresses on returns and is left as it is)."""

    name = "ppo"

    def __init__(self, params: PPOParams, chunk_size: int = 1024, correction: Correction | None = None):
        self.p, self.chunk_size, self.correction = params, chunk_size, correction

    def count(self, batch: Batch) -> int:
        return int(batch["completion_mask"].sum())

    def loss_parts(self, model: SharedRoles, batch: Batch) -> Iterator[tuple[torch.Tensor, dict[str, float]]]:
        """The policy part, then the value part: the loop backpropagates each before the next is built."""
        logp, entropy = model.logps_entropy(batch, self.p.temperature, self.chunk_size)
        mask = batch["completion_mask"].to(logp.device, logp.dtype)
        old = batch["old_logp"].to(logp.device, logp.dtype)
        pg, clipped = ppo_clip_loss(logp, old, batch["advantages"].to(logp.device, logp.dtype), self.p.clip_eps)
        mismatch = {}
        if "engine_logp" in batch:
            pg, mismatch = corrected(pg, old, batch["engine_logp"].to(logp.device, logp.dtype), mask, self.correction)
        metrics = {**mismatch, "policy_loss": float(masked_mean(pg.detach(), mask)),
                   "clip_fraction": float(masked_mean(clipped, mask)),
                   "approx_kl_old": float(masked_mean((old - logp).detach(), mask)),
                   "entropy": float(masked_mean(entropy, mask))}  # GRPO's: over completion tokens
        metrics.update({k: float(v) for k, v in batch.get("metrics", {}).items()})
        yield (pg * mask).sum(), metrics
        del logp, pg, entropy
        values = model.values(batch)
        vmask = batch["completion_mask"].to(values.device, values.dtype)
        vf = clipped_value_loss(values, batch["old_values"].to(values.device), batch["returns"].to(values.device),
                                self.p.value_clip)
        yield self.p.vf_coef * (vf * vmask).sum(), {"value_loss": float(masked_mean(vf.detach(), vmask))}

    def loss_sum(self, model: SharedRoles, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Both parts at once (for callers that want one number)."""
        total, metrics = torch.zeros(()), {}
        for loss, m in self.loss_parts(model, batch):
            total = total + loss.to(total.dtype)
            metrics.update(m)
        return total, metrics


@dataclass(frozen=True, eq=False)
class StepRewards:
    """Process rewards for PPO (``ppo.step_rewards``): each completion is cut into steps (``step_split``, as
    ``posttrain data prm-labels`` cuts solutions), a PRM scores every step from the prompt's chat, and each step's
    reward (``STEP_REWARDS[step_reward_form]`` of its probability) times ``step_reward_coef`` lands on the
    completion token that writes the step's last character. They add to the reward model's outcome score rather
    than replace it: the outcome score is what the critic starts from, and the last step of a solution is judged
    by both. The PRM is a model of its own (``rewards.load_prm``), read on its own rendering of the steps."""

    scorer: StepScorer
    step_reward_coef: float
    step_reward_form: str
    step_split: str
    batch_size: int = 8

    def __call__(self, tokenizer, chats: list[Any], completion_ids: list[list[int]], rewards: torch.Tensor
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``rewards`` (N, T) plus the step rewards, and their metrics."""
        found = [completion_steps(tokenizer, ids, self.step_split) for ids in completion_ids]
        probs = score_solutions(self.scorer, chats, [steps for steps, _ in found], self.batch_size)
        width = max([1, *map(len, probs)])
        p, mask = torch.zeros(len(probs), width), torch.zeros(len(probs), width)
        at = torch.zeros(len(probs), width, dtype=torch.long)
        for i, (row, (_, ends)) in enumerate(zip(probs, found)):
            p[i, :len(row)], at[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), torch.tensor(ends), 1.0
        shaped = STEP_REWARDS[self.step_reward_form](p, mask)
        metrics = {"reward/prm_steps": (self.step_reward_coef * shaped).sum(1).mean().double(),
                   "prm/steps": mask.sum(1).mean().double(), "prm/p_step": masked_mean(p, mask).double()}
        return step_shaped_rewards(rewards, shaped, at, mask, self.step_reward_coef), metrics


@dataclass(frozen=True, eq=False)
class PPOBatches:
    """A ``RolloutSchedule``'s ``make_batches`` for PPO. Per rollout: sample, score with the reward adapter,
    old/reference log-probs and values, KL-shaped rewards, GAE, whitened advantages over the whole rollout, then
    micro-batches."""

    roles: SharedRoles
    params: PPOParams
    chunk_size: int = 1024
    steps: StepRewards | None = None

    @torch.no_grad()
    def __call__(self, schedule: RolloutSchedule, rollout: int) -> list[Batch]:
        roles, p, n = self.roles, self.params, self.params.samples_per_prompt
        idx, ro = schedule.sample(rollout, n, max_new_tokens=p.max_new_tokens, temperature=p.temperature,
                                  top_p=p.top_p, min_new_tokens=p.min_new_tokens)
        batches = schedule.micro_batches(ro)
        mask, old, ref, values, raw = role_passes(roles, batches, p.temperature, self.chunk_size)
        finished = torch.tensor(ro.finished)
        scores = raw - p.missing_eos_penalty * (~finished).float()
        rewards = kl_shaped_rewards(scores, old, ref, mask, p.kl_coef)
        step_metrics: dict[str, torch.Tensor] = {}
        if self.steps is not None:
            chats = [schedule.chats[i] for i in idx for _ in range(n)]
            rewards, step_metrics = self.steps(schedule.tok, chats, ro.completion_ids, rewards)
        adv, returns = gae(rewards, values, mask, p.gamma, p.lam)
        if p.whiten_advantages:
            adv = whiten(adv, mask, moments=rollout_moments(adv, mask))
        kl = masked_mean(old - ref, mask, dim=1)
        metrics = {"reward": raw.mean().double(), "reward_std": raw.std(correction=0).double(), **step_metrics,
                   "score_shaped": scores.mean().double(), "kl": kl.mean().double(),
                   "non_score_reward": (-p.kl_coef * kl).mean().double(),
                   "value_mean": masked_mean(values, mask).double(),
                   "return_mean": masked_mean(returns, mask).double(), **schedule.rollout_metrics(idx, n, ro)}
        schedule.last_rollout = {"rollout": rollout, "prompts": idx, "texts": ro.texts, "rewards": raw.tolist()}
        return with_targets(batches, old, values, adv, returns, metrics)


@torch.no_grad()
def role_passes(roles: SharedRoles, batches: list[Batch], temperature: float, chunk_size: int = 1024,
                score: bool = True) -> tuple[torch.Tensor, ...]:
    """One rollout's (N, W) completion mask, old and reference log-probs and values, padded to one width over its
    micro-batches, and the reward model's (N,) scores (None where ``score`` is off: no reward model)."""
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("scores", "old", "ref", "values")}
    with evaluating(roles):
        for b in batches:
            if score:
                parts["scores"].append(roles.scores(b))
            parts["old"].append(roles.logps(b, temperature, chunk_size))
            parts["ref"].append(roles.ref_logps(b, temperature, chunk_size))
            parts["values"].append(roles.values(b))
    width = max(b["completion_mask"].shape[1] for b in batches)
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
    mask = torch.cat([pad(b["completion_mask"]) for b in batches]).float()
    old, ref, values = (torch.cat([pad(t.float()) for t in parts[k]]) for k in ("old", "ref", "values"))
    return mask, old, ref, values, torch.cat(parts["scores"]) if score else None


def with_targets(batches: list[Batch], old: torch.Tensor, values: torch.Tensor, adv: torch.Tensor,
                 returns: torch.Tensor, metrics: dict[str, torch.Tensor]) -> list[Batch]:
    """The micro-batches with their rows' share of the rollout's (N, W) targets and the rollout's metrics."""
    at = 0
    for b in batches:
        k, w = b["completion_mask"].shape
        for key, full in (("old_logp", old), ("old_values", values), ("advantages", adv), ("returns", returns)):
            b[key] = full[at:at + k, :w].contiguous()
        b["metrics"] = {name: v.float() for name, v in metrics.items()}
        at += k
    return batches


def rollout_moments(x: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """Mean and variance of the masked entries over the whole rollout: under torchrun each process holds a share of
    it, so the sums are taken over processes (whitening then equals one process's on the whole rollout)."""
    total, count = sum_over_ranks([float((x * mask).sum()), float(mask.sum())])
    mean = total / max(count, 1.0)
    (squares,) = sum_over_ranks([float((((x - mean) ** 2) * mask).sum())])
    return mean, squares / max(count, 1.0)


def ppo_schedule(model: SharedRoles, tokenizer, prompts: list[list[int]], rows: list[dict[str, Any]],
                 chats: list[Any], params: PPOParams, *, prompts_per_step: int, mu: int, micro_batch_size: int,
                 seed: int, chunk_size: int = 1024, share_prompt: bool = True,
                 watch: RewardFn | None = None, engine: RolloutEngine | None = None,
                 ahead: bool = False, steps: StepRewards | None = None) -> RolloutSchedule:
    """PPO's rollout schedule: ``RolloutSchedule`` over the actor (``model.policy``) with ``PPOBatches``."""
    return RolloutSchedule(model.policy, tokenizer, prompts, rows, chats,
                           make_batches=PPOBatches(model, params, chunk_size, steps), prompts_per_step=prompts_per_step,
                           mu=mu, micro_batch_size=micro_batch_size, seed=seed, share_prompt=share_prompt,
                           watch=watch, engine=engine, ahead=ahead)


@torch.no_grad()
def ppo_eval(model: SharedRoles, tokenizer, prompts: list[list[int]], rows: list[dict[str, Any]], chats: list[Any],
             max_new_tokens: int, batch_size: int = 8, pad_id: int = 0, watch: RewardFn | None = None,
             share_prompt: bool = True) -> dict[str, float]:
    """Greedy answers to held-out prompts scored by the reward adapter (the proxy) and by the watch terms."""

    ro = sample_completions(model.policy, tokenizer, prompts, n=1, max_new_tokens=max_new_tokens, temperature=0.0,
                            batch_size=batch_size)
    with evaluating(model):
        scores = torch.cat([model.scores(collate_rollouts(ro.prompt_ids[k:k + batch_size],
                                                          ro.completion_ids[k:k + batch_size], pad_id, share_prompt))
                            for k in range(0, len(prompts), batch_size)])
    out = {"eval/reward": float(scores.mean()),
           "eval/completion_len": sum(len(c) for c in ro.completion_ids) / max(len(prompts), 1)}
    if watch is not None:
        out.update(mean_scores(watch, "eval/watch", chats, ro, rows))
    return out
