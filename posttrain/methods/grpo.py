"""GRPO: group-relative advantages from verifiable rewards, a clipped ratio per token, and k3 KL to a reference.

Each optimizer step trains on one batch of rollouts; with ``mu`` > 1 the same rollouts serve ``mu`` consecutive
steps, their old log-probs fixed when they were sampled (the ratio then moves away from 1 and the clip matters).
``RolloutPlan`` is the engine's batch plan: it samples with the current policy, scores, and collates, so the one
training loop (checkpoints, logging, evaluation) runs GRPO as it runs SFT and DPO.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from posttrain.losses.rl import clipped_surrogate, group_advantages, kl_k3
from posttrain.methods.preference import AdapterOffReference, FrozenCopyReference
from posttrain.rollout.batch import rollout_logps
from posttrain.rollout.plan import RewardFn, RolloutSchedule, mean_scores, part_metrics
from posttrain.rollout.sample import sample_completions

Batch = dict[str, torch.Tensor]


def _seq_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum(1) / mask.sum(1).clamp(min=1)


# How per-token losses become the step's loss: (summed loss of a micro-batch, its loss units); the loop divides
# the step's summed loss by its summed units.
def _agg_sequence(loss: torch.Tensor, mask: torch.Tensor, max_new: int) -> tuple[torch.Tensor, int]:
    """GRPO as published: mean over each completion's tokens, then mean over completions."""
    return _seq_mean(loss, mask).sum(), int(mask.shape[0])


def _agg_token(loss: torch.Tensor, mask: torch.Tensor, max_new: int) -> tuple[torch.Tensor, int]:
    """DAPO (Yu et al. 2025): mean over all tokens of the batch, so long completions are not down-weighted."""
    return (loss * mask).sum(), int(mask.sum())


def _agg_constant(loss: torch.Tensor, mask: torch.Tensor, max_new: int) -> tuple[torch.Tensor, int]:
    """Dr. GRPO (Liu et al. 2025): token sum over a constant (max new tokens), removing the length bias."""
    return (loss * mask).sum() / max_new, int(mask.shape[0])


AGGREGATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, int]]] = {
    "grpo": _agg_sequence, "dapo": _agg_token, "dr_grpo": _agg_constant}


@dataclass
class GRPOParams:
    group_size: int = 4
    clip_eps: float = 0.2
    kl_coef: float = 0.04
    temperature: float = 1.0
    max_new_tokens: int = 128
    aggregation: str = "grpo"
    min_new_tokens: int = 0


class GRPO:
    """The loss of one micro-batch of scored rollouts (see ``RolloutPlan`` for what a batch carries)."""

    name = "grpo"

    def __init__(self, params: GRPOParams, chunk_size: int = 1024):
        if params.aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {params.aggregation!r}; known: {', '.join(AGGREGATIONS)}")
        self.p, self.chunk_size, self.agg = params, chunk_size, AGGREGATIONS[params.aggregation]

    def count(self, batch: Batch) -> int:
        mask = batch["completion_mask"].float()
        return self.agg(torch.zeros_like(mask), mask, self.p.max_new_tokens)[1]

    def loss_sum(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        logp = rollout_logps(model, batch, self.p.temperature, self.chunk_size)
        mask = batch["completion_mask"].to(logp.device, logp.dtype)
        old = batch["old_logp"].to(logp.device, logp.dtype) if "old_logp" in batch else logp.detach()
        adv = batch["advantages"].to(logp.device, logp.dtype)
        per_token, clipped = clipped_surrogate(logp, old, adv, self.p.clip_eps)
        metrics = {"clip_fraction": float((clipped * mask).sum() / mask.sum().clamp(min=1))}
        if "ref_logp" in batch:
            kl = kl_k3(logp, batch["ref_logp"].to(logp.device, logp.dtype))
            per_token = per_token + self.p.kl_coef * kl
            metrics["kl"] = float((kl.detach() * mask).sum() / mask.sum().clamp(min=1))
        loss, _ = self.agg(per_token, mask, self.p.max_new_tokens)
        metrics.update({k.removeprefix("m/"): float(v) for k, v in batch.items() if k.startswith("m/")})
        return loss, metrics


class RolloutPlan(RolloutSchedule):
    """Per optimizer step: ``prompts_per_step`` prompts, ``group_size`` completions each, rewards, advantages,
    reference (and, with mu > 1, old) log-probs, as micro-batches of ``micro_batch_size`` completions."""

    def __init__(self, model: torch.nn.Module, tokenizer, prompts: list[list[int]], rows: list[dict[str, Any]],
                 chats: list[Any], reward: RewardFn, params: GRPOParams, *, prompts_per_step: int, mu: int,
                 micro_batch_size: int, seed: int, reference: Callable[[torch.nn.Module, Batch], torch.Tensor] | None,
                 top_p: float = 1.0, chunk_size: int = 1024, share_prompt: bool = True, watch: RewardFn | None = None):
        super().__init__(model, tokenizer, prompts, rows, chats, prompts_per_step=prompts_per_step, mu=mu,
                         micro_batch_size=micro_batch_size, seed=seed, share_prompt=share_prompt, watch=watch)
        self.reward, self.p, self.reference, self.top_p, self.chunk_size = reward, params, reference, top_p, chunk_size

    def _rollout(self, rollout: int) -> list[Batch]:
        g = self.p.group_size
        idx, ro = self.sample(rollout, g, max_new_tokens=self.p.max_new_tokens, temperature=self.p.temperature,
                              top_p=self.top_p, min_new_tokens=self.p.min_new_tokens)
        scores = self.score(self.reward, idx, g, ro.texts)
        rewards = torch.tensor(scores, dtype=torch.float64)
        adv = group_advantages(rewards, g)
        metrics = {"m/reward": rewards.mean(), "m/reward_std": rewards.reshape(-1, g).std(1, correction=0).mean(),
                   **part_metrics(self.reward, "m/reward"), **self.rollout_metrics(idx, g, ro)}
        self.last_rollout = {"rollout": rollout, "prompts": idx, "texts": ro.texts, "rewards": scores}
        batches = self.micro_batches(ro)
        at = 0
        for b in batches:
            n = b["completion_mask"].shape[0]
            b["advantages"] = adv[at:at + n].float()
            at += n
            with torch.no_grad():
                if self.reference is not None:
                    b["ref_logp"] = self.reference(self.model, b)
                if self.mu > 1:
                    b["old_logp"] = rollout_logps(self.model, b, self.p.temperature, self.chunk_size)
            b.update({k: v.float() for k, v in metrics.items()})
        return batches


def token_reference(model: torch.nn.Module, lora: bool, temperature: float, chunk_size: int = 1024):
    """Per-token reference log-probs: the adapter-off policy (LoRA) or a frozen copy (full fine-tuning)."""
    logps = lambda m, b: rollout_logps(m, b, temperature, chunk_size)  # noqa: E731
    return AdapterOffReference(logps=logps) if lora else FrozenCopyReference(model, logps=logps)


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
