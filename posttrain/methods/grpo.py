"""GRPO: group-relative advantages from verifiable rewards, a clipped ratio per token, and k3 KL to a reference.

Each optimizer step trains on one batch of rollouts; with ``mu`` > 1 the same rollouts serve ``mu`` consecutive
steps, their old log-probs fixed when they were sampled (the ratio then moves away from 1 and the clip matters).
``RolloutPlan`` is the engine's batch plan: it samples with the current policy, scores, and collates, so the one
training loop (checkpoints, logging, evaluation) runs GRPO as it runs SFT and DPO.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

import torch

from posttrain.losses.rl import clipped_surrogate, group_advantages, kl_k3
from posttrain.methods.preference import AdapterOffReference, FrozenCopyReference
from posttrain.rollout.batch import collate_rollouts, rollout_logps
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


RewardFn = Callable[..., list[float]]


class RolloutPlan:
    """Per optimizer step: ``prompts_per_step`` prompts, ``group_size`` completions each, rewards, advantages,
    reference (and, with mu > 1, old) log-probs, as micro-batches of ``micro_batch_size`` completions.

    Prompts are visited in a seeded permutation per epoch and sampling is seeded by the rollout number, so a run
    resumed at a rollout boundary samples what the uninterrupted run sampled.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, prompts: list[list[int]], rows: list[dict[str, Any]],
                 chats: list[Any], reward: RewardFn, params: GRPOParams, *, prompts_per_step: int, mu: int,
                 micro_batch_size: int, seed: int, reference: Callable[[torch.nn.Module, Batch], torch.Tensor] | None,
                 top_p: float = 1.0, chunk_size: int = 1024, share_prompt: bool = True):
        self.model, self.tok, self.prompts, self.rows, self.chats = model, tokenizer, prompts, rows, chats
        self.reward, self.p, self.per_step, self.mu = reward, params, prompts_per_step, mu
        self.micro, self.seed, self.reference, self.top_p, self.chunk_size = micro_batch_size, seed, reference, \
            top_p, chunk_size
        self.share_prompt = share_prompt
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._cached: tuple[int, list[Batch]] | None = None
        self._order: tuple[int, list[int]] = (-1, [])  # (epoch, its prompt permutation)
        self.last_rollout: dict[str, Any] = {}

    def steps_for(self, epochs: float) -> int:
        rollouts = max(1, round(epochs * len(self.prompts) / self.per_step))
        return rollouts * self.mu

    def _prompt_indices(self, rollout: int) -> list[int]:
        out = []
        for k in range(rollout * self.per_step, (rollout + 1) * self.per_step):
            epoch, i = divmod(k, len(self.prompts))
            if self._order[0] != epoch:
                order = list(range(len(self.prompts)))
                random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
                self._order = (epoch, order)
            out.append(self._order[1][i])
        return out

    def step(self, step: int) -> list[Batch]:
        rollout = step // self.mu
        if self._cached is None or self._cached[0] != rollout:
            self._cached = (rollout, self._rollout(rollout))
        return self._cached[1]

    def _rollout(self, rollout: int) -> list[Batch]:
        g = self.p.group_size
        idx = self._prompt_indices(rollout)
        rng_state = torch.get_rng_state()
        torch.manual_seed(self.seed * 1_000_003 + rollout)
        ro = sample_completions(self.model, self.tok, [self.prompts[i] for i in idx], n=g,
                                max_new_tokens=self.p.max_new_tokens, temperature=self.p.temperature,
                                top_p=self.top_p, min_new_tokens=self.p.min_new_tokens, batch_size=max(self.micro, g))
        torch.set_rng_state(rng_state)
        columns = {k: [self.rows[i].get(k) for i in idx for _ in range(g)] for k in self.rows[idx[0]]}
        scores = self.reward([self.chats[i] for i in idx for _ in range(g)], ro.texts, **columns)
        rewards = torch.tensor(scores, dtype=torch.float64)
        adv = group_advantages(rewards, g)
        lengths = torch.tensor([len(c) for c in ro.completion_ids], dtype=torch.float64)
        metrics = {"m/reward": rewards.mean(), "m/reward_std": rewards.reshape(-1, g).std(1, correction=0).mean(),
                   "m/completion_len": lengths.mean(),
                   "m/truncated": 1.0 - torch.tensor(ro.finished, dtype=torch.float64).mean()}
        for name, part in getattr(self.reward, "parts", {}).items():
            if not name.endswith("@w"):
                metrics[f"m/reward/{name}"] = torch.tensor(part, dtype=torch.float64).mean()
        self.last_rollout = {"rollout": rollout, "prompts": idx, "texts": ro.texts, "rewards": scores}
        batches = []
        for k in range(0, len(ro.texts), self.micro):
            b = collate_rollouts(ro.prompt_ids[k:k + self.micro], ro.completion_ids[k:k + self.micro], self.pad_id,
                                 self.share_prompt)
            b["advantages"] = adv[k:k + self.micro].float()
            with torch.no_grad():
                if self.reference is not None:
                    b["ref_logp"] = self.reference(self.model, b)
                if self.mu > 1:
                    b["old_logp"] = rollout_logps(self.model, b, self.p.temperature, self.chunk_size)
            b.update({k2: v.float() for k2, v in metrics.items()})
            batches.append(b)
        return batches


def token_reference(model: torch.nn.Module, lora: bool, temperature: float, chunk_size: int = 1024):
    """Per-token reference log-probs: the adapter-off policy (LoRA) or a frozen copy (full fine-tuning)."""
    logps = lambda m, b: rollout_logps(m, b, temperature, chunk_size)  # noqa: E731
    return AdapterOffReference(logps=logps) if lora else FrozenCopyReference(model, logps=logps)


@torch.no_grad()
def grpo_eval(model: torch.nn.Module, tokenizer, prompts: list[list[int]], rows: list[dict[str, Any]],
              chats: list[Any], reward: RewardFn, max_new_tokens: int, batch_size: int = 16) -> dict[str, float]:
    """Greedy completions of held-out prompts: mean reward and each reward term's mean."""
    ro = sample_completions(model, tokenizer, prompts, n=1, max_new_tokens=max_new_tokens, temperature=0.0,
                            batch_size=batch_size)
    columns = {k: [r.get(k) for r in rows] for k in rows[0]} if rows else {}
    scores = reward(chats, ro.texts, **columns)
    out = {"eval/reward": sum(scores) / max(len(scores), 1),
           "eval/completion_len": sum(len(c) for c in ro.completion_ids) / max(len(scores), 1)}
    for name, part in getattr(reward, "parts", {}).items():
        if not name.endswith("@w"):
            out[f"eval/reward/{name}"] = sum(part) / max(len(part), 1)
    return out
