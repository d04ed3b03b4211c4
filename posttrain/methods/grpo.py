"""GRPO (Shao et al. 2024): group-relative advantages from verifiable rewards, a clipped ratio per token, k3 KL.

Per rollout: ``prompts_per_step`` prompts, G = ``group_size`` completions of each sampled from the current policy
at ``temperature`` (and ``top_p``), one reward r_i per completion. Every token of completion i gets its group's

  A_i = (r_i - mean_G(r)) / (std_G(r) + 1e-6),   std_G the population std (divides by G, not G - 1)

(``losses.rl.group_advantages``; a group whose rewards are all equal has A = 0). Per completion token t, with
log-probs under logits / temperature (the distribution sampled from):

  loss_t = -min(rho_t A_i, clip(rho_t, 1 - clip_eps, 1 + clip_eps) A_i) + kl_coef * k3_t
  rho_t = exp(log pi(t) - log pi_old(t)),   k3_t = exp(d_t) - d_t - 1,  d_t = log ref(t) - log pi(t)

k3 is Schulman's KL(policy || reference) estimator; the reference is the policy with its LoRA adapters disabled
(full fine-tuning: a frozen copy; ``models.reference.make_reference``), its log-probs computed once per rollout.
Without a reference (the recipe passes none when kl_coef is 0) there is no KL term.

The step's loss aggregates loss_t over the step's completions (``losses.reduce``, ``aggregation``):
  grpo:    each completion's token sum / its own length, then summed / the number of completions;
  dapo:    token sum / the number of completion tokens;
  dr_grpo: token sum / (max_new_tokens * the number of completions).

``mu``: each rollout serves ``mu`` consecutive optimizer steps. With mu = 1, pi_old is the policy itself
(detached): rho = 1, the clip never binds, and the gradient is the plain policy gradient of -A log pi. With
mu > 1, log pi_old is computed once when the rollout is sampled, before its first step, and kept fixed: on the
later steps rho moves away from 1, and where it is past 1 + clip_eps (A > 0) or below 1 - clip_eps (A < 0) the
token's loss is constant, so no gradient pushes the ratio further.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from posttrain.losses.offpolicy import Correction, corrected
from posttrain.losses.reduce import AGGREGATIONS
from posttrain.losses.rl import clipped_surrogate, group_advantages, kl_k3
from posttrain.models.forward import Batch, token_logps
from posttrain.rollout.interface import RolloutEngine
from posttrain.rollout.sample import sample_completions
from posttrain.rollout.schedule import RewardFn, RolloutSchedule, mean_scores, part_metrics


@dataclass
class GRPOParams:
    """GRPO's settings; no defaults here: a run takes them from ``posttrain.config.GRPOSection``, where each default
    is declared once (``recipes._common.from_section``)."""
    group_size: int
    clip_eps: float
    kl_coef: float
    temperature: float
    max_new_tokens: int
    aggregation: str
    min_new_tokens: int


class GRPO:
    """The loss of one micro-batch of scored rollouts (see ``GRPOBatches`` for what a batch carries). Where a batch
    carries the rollout engine's log-probs, the train-inference mismatch is logged and, with a ``correction``, the
    per-token loss is importance-weighted (``losses.offpolicy.corrected``)."""

    name = "grpo"
    loss_parts = None  # one part: loss_sum (engine.loop.Method)

    def __init__(self, params: GRPOParams, chunk_size: int = 1024, correction: Correction | None = None):
        if params.aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {params.aggregation!r}; known: {', '.join(AGGREGATIONS)}")
        self.p, self.chunk_size, self.agg = params, chunk_size, AGGREGATIONS[params.aggregation]
        self.correction = correction

    def count(self, batch: Batch) -> int:
        mask = batch["completion_mask"].float()
        return self.agg(torch.zeros_like(mask), mask, self.p.max_new_tokens)[1]

    def loss_sum(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        logp = token_logps(model, batch, self.p.temperature, self.chunk_size)
        mask = batch["completion_mask"].to(logp.device, logp.dtype)
        old = batch["old_logp"].to(logp.device, logp.dtype) if "old_logp" in batch else logp.detach()
        adv = batch["advantages"].to(logp.device, logp.dtype)
        per_token, clipped = clipped_surrogate(logp, old, adv, self.p.clip_eps)
        metrics = {"clip_fraction": float((clipped * mask).sum() / mask.sum().clamp(min=1))}
        if "ref_logp" in batch:
            kl = kl_k3(logp, batch["ref_logp"].to(logp.device, logp.dtype))
            per_token = per_token + self.p.kl_coef * kl
            metrics["kl"] = float((kl.detach() * mask).sum() / mask.sum().clamp(min=1))
        if "engine_logp" in batch:
            per_token, mismatch = corrected(per_token, old, batch["engine_logp"].to(logp.device, logp.dtype), mask,
                                            self.correction)
            metrics.update(mismatch)
        loss, _ = self.agg(per_token, mask, self.p.max_new_tokens)
        metrics.update({k: float(v) for k, v in batch.get("metrics", {}).items()})
        return loss, metrics


@dataclass(frozen=True, eq=False)
class GRPOBatches:
    """A ``RolloutSchedule``'s ``make_batches`` for GRPO. Per rollout: ``prompts_per_step`` prompts,
    ``group_size`` completions each, rewards, advantages, reference (and, with mu > 1, old) log-probs, as
    micro-batches of ``micro_batch_size`` completions."""

    reward: RewardFn
    params: GRPOParams
    reference: Callable[[torch.nn.Module, Batch], torch.Tensor] | None
    top_p: float = 1.0
    chunk_size: int = 1024

    def __call__(self, schedule: RolloutSchedule, rollout: int) -> list[Batch]:
        p, g = self.params, self.params.group_size
        idx, ro = schedule.sample(rollout, g, max_new_tokens=p.max_new_tokens, temperature=p.temperature,
                                  top_p=self.top_p, min_new_tokens=p.min_new_tokens)
        scores = schedule.score(self.reward, idx, g, ro.texts)
        rewards = torch.tensor(scores, dtype=torch.float64)
        adv = group_advantages(rewards, g)
        metrics = {"reward": rewards.mean(), "reward_std": rewards.reshape(-1, g).std(1, correction=0).mean(),
                   **part_metrics(self.reward, "reward"), **schedule.rollout_metrics(idx, g, ro)}
        schedule.last_rollout = {"rollout": rollout, "prompts": idx, "texts": ro.texts, "rewards": scores}
        batches = schedule.micro_batches(ro)
        at = 0
        for b in batches:
            n = b["completion_mask"].shape[0]
            b["advantages"] = adv[at:at + n].float()
            at += n
            with torch.no_grad():
                if self.reference is not None:
                    b["ref_logp"] = self.reference(schedule.model, b)
                if schedule.mu > 1:
                    b["old_logp"] = token_logps(schedule.model, b, p.temperature, self.chunk_size)
            b["metrics"] = {k: v.float() for k, v in metrics.items()}
        return batches


def grpo_schedule(model: torch.nn.Module, tokenizer, prompts: list[list[int]], rows: list[dict[str, Any]],
                  chats: list[Any], reward: RewardFn, params: GRPOParams, *, prompts_per_step: int, mu: int,
                  micro_batch_size: int, seed: int, reference: Callable[[torch.nn.Module, Batch], torch.Tensor] | None,
                  top_p: float = 1.0, chunk_size: int = 1024, share_prompt: bool = True,
                  watch: RewardFn | None = None, engine: RolloutEngine | None = None,
                  ahead: bool = False) -> RolloutSchedule:
    """GRPO's rollout schedule: ``RolloutSchedule`` with ``GRPOBatches`` as its ``make_batches``."""
    return RolloutSchedule(model, tokenizer, prompts, rows, chats,
                           make_batches=GRPOBatches(reward, params, reference, top_p, chunk_size),
                           prompts_per_step=prompts_per_step, mu=mu, micro_batch_size=micro_batch_size, seed=seed,
                           share_prompt=share_prompt, watch=watch, engine=engine, ahead=ahead)


@torch.no_grad()
def grpo_eval(model: torch.nn.Module, tokenizer, prompts: list[list[int]], rows: list[dict[str, Any]],
              chats: list[Any], reward: RewardFn, max_new_tokens: int, batch_size: int = 16,
              watch: RewardFn | None = None) -> dict[str, float]:
    """Greedy completions of held-out prompts: mean reward and each reward (and watch) term's mean."""
    ro = sample_completions(model, tokenizer, prompts, n=1, max_new_tokens=max_new_tokens, temperature=0.0,
                            batch_size=batch_size)
    out = {"eval/completion_len": sum(len(c) for c in ro.completion_ids) / max(len(prompts), 1),
           **mean_scores(reward, "eval/reward", chats, ro.texts, rows)}
    if watch is not None:
        out.update(mean_scores(watch, "eval/watch", chats, ro.texts, rows))
    return out
