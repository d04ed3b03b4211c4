"""GRPO (Shao et al. 2024) and its 2025-26 variants: group-relative advantages from verifiable rewards, a clipped
ratio, a KL estimate to the reference. Every variant is a named entry of a table, chosen by a config key:

- the advantage (``losses.advantages.ADVANTAGES``, ``advantage``): grpo (with ``std`` sample | population | none),
  dr_grpo, rloo, reinforce_pp, reinforce_pp_baseline; every token of completion i gets A_i;
- the policy loss (``losses.policy.POLICY_LOSSES``, ``policy_loss``): ppo_clip (a ratio per token) or gspo (one per
  completion), each clipped to [1 - clip_eps_low, 1 + clip_eps_high] (DAPO's clip-higher when high > low), with an
  optional dual clip for negative advantages;
- the KL (``losses.policy.KL_ESTIMATORS``, ``kl_estimator``): k1, k2, k3, times pi / pi_old by default
  (``kl_ratio_corrected``);
- the aggregation (``losses.reduce.AGGREGATIONS``): grpo, dapo, dr_grpo (default: the estimator's published one);
- which groups train (``dynamic_sampling``, ``losses.advantages.GROUP_FILTERS``) and whether truncated completions
  do (``truncated``, ``losses.advantages.TRUNCATED``).

Per completion token t, with log-probs under logits / temperature (the distribution sampled from):

  loss_t = policy_loss_t(rho, A_i) + kl_coef * KL_t,    rho = pi / pi_old

The reference is the policy with its LoRA adapters disabled (full fine-tuning: a frozen copy;
``models.reference.make_reference``), its log-probs computed once per rollout. Without a reference (the recipe
passes none when kl_coef is 0) there is no KL term.

``mu``: each rollout serves ``mu`` consecutive optimizer steps. With mu = 1, pi_old is the policy itself
(detached): rho = 1, the clip never binds, and the gradient is the plain policy gradient of -A log pi. With
mu > 1, log pi_old is computed once when the rollout is sampled, before its first step, and kept fixed.

Every step logs ``entropy``, the mean over completion tokens of the sampling distribution's exact entropy at that
token (from the same chunked log-softmax as the loss), the signal of entropy collapse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from posttrain.losses.advantages import ADVANTAGES, GROUP_FILTERS, TRUNCATED, advantages
from posttrain.losses.offpolicy import Correction, corrected
from posttrain.losses.policy import Clip, PolicyGradient, policy_gradient_terms
from posttrain.losses.reduce import AGGREGATIONS
from posttrain.models.forward import Batch, token_logps, token_logps_entropy
from posttrain.rollout.interface import RolloutEngine
from posttrain.rollout.sample import Rollout, sample_completions
from posttrain.rollout.schedule import RewardFn, RolloutSchedule, mean_scores, part_metrics


@dataclass
class GRPOParams:
    """GRPO's settings; no defaults here: a run takes them from ``posttrain.config.GRPOSection``, where each default
    is declared once (``recipes._common.from_section``)."""
    group_size: int
    clip_eps: float
    clip_eps_low: float | None
    clip_eps_high: float | None
    dual_clip: float | None
    policy_loss: str
    advantage: str
    std: str
    kl_coef: float
    kl_estimator: str
    kl_ratio_corrected: bool
    temperature: float
    max_new_tokens: int
    aggregation: str | None
    min_new_tokens: int
    dynamic_sampling: str
    max_draws: int
    truncated: str

    @property
    def aggregation_name(self) -> str:
        """The aggregation in force: the configured one, or the advantage estimator's published one."""
        return self.aggregation or ADVANTAGES[self.advantage].aggregation

    def policy_gradient(self) -> PolicyGradient:
        clip = Clip(self.clip_eps_low or self.clip_eps, self.clip_eps_high or self.clip_eps, self.dual_clip)
        return PolicyGradient(self.policy_loss, clip, self.kl_coef, self.kl_estimator, self.kl_ratio_corrected)


def loss_mask(batch: Batch, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, L) the tokens that carry loss: the completion mask, times 0 for a completion masked out whole
    (``row_weight``, from ``truncated: mask``)."""
    mask = batch["completion_mask"].to(dtype)
    return mask * batch["row_weight"].to(dtype)[:, None] if "row_weight" in batch else mask


class GRPO:
    """The loss of one micro-batch of scored rollouts (see ``GRPOBatches`` for what a batch carries). Where a batch
    carries the rollout engine's log-probs, the train-inference mismatch is logged and, with a ``correction``, the
    per-token loss is importance-weighted (``losses.offpolicy.corrected``)."""

    name = "grpo"
    loss_parts = None  # one part: loss_sum (engine.loop.Method)

    def __init__(self, params: GRPOParams, chunk_size: int = 1024, correction: Correction | None = None):
        for key, table in (("advantage", ADVANTAGES), ("dynamic_sampling", GROUP_FILTERS), ("truncated", TRUNCATED)):
            if getattr(params, key) not in table:
                raise ValueError(f"unknown {key} {getattr(params, key)!r}; known: {', '.join(table)}")
        if params.aggregation_name not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {params.aggregation_name!r}; known: {', '.join(AGGREGATIONS)}")
        self.p, self.chunk_size, self.agg = params, chunk_size, AGGREGATIONS[params.aggregation_name]
        self.pg = params.policy_gradient()
        self.correction = correction

    def count(self, batch: Batch) -> int:
        mask = loss_mask(batch)
        return self.agg(torch.zeros_like(mask), mask, self.p.max_new_tokens)[1]

    def loss_sum(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        logp, entropy = token_logps_entropy(model, batch, self.p.temperature, self.chunk_size)
        mask = loss_mask(batch, logp.dtype).to(logp.device)
        old = batch["old_logp"].to(logp.device, logp.dtype) if "old_logp" in batch else logp.detach()
        adv = batch["advantages"].to(logp.device, logp.dtype)
        ref = batch["ref_logp"].to(logp.device, logp.dtype) if "ref_logp" in batch else None
        per_token, clipped, kl = policy_gradient_terms(logp, old, adv, mask, ref, self.pg)
        tokens = batch["completion_mask"].to(logp.device, logp.dtype)
        n = tokens.sum().clamp(min=1)
        metrics = {"clip_fraction": float((clipped * mask).sum() / mask.sum().clamp(min=1)),
                   "entropy": float((entropy * tokens).sum() / n)}
        if kl is not None:
            metrics["kl"] = float((kl * mask).sum() / mask.sum().clamp(min=1))
        if "engine_logp" in batch:
            per_token, mismatch = corrected(per_token, old, batch["engine_logp"].to(logp.device, logp.dtype), mask,
                                            self.correction)
            metrics.update(mismatch)
        loss, _ = self.agg(per_token, mask, self.p.max_new_tokens)
        metrics.update({k: float(v) for k, v in batch.get("metrics", {}).items()})
        return loss, metrics


@dataclass
class Group:
    """One prompt's G completions from a rollout draw, with their rewards and each reward term's scores."""
    prompt: int
    ro: Rollout
    scores: list[float]
    parts: dict[str, list[float]]


def split_groups(idx: list[int], ro: Rollout, scores: list[float], parts: dict[str, list[float]],
                 g: int) -> list[Group]:
    def cut(xs: list, k: int) -> list:
        return xs[k * g:(k + 1) * g]

    return [Group(i, Rollout(cut(ro.prompt_ids, k), cut(ro.completion_ids, k), cut(ro.texts, k), cut(ro.finished, k),
                             cut(ro.logprobs, k), ro.version), cut(scores, k), {n: cut(v, k) for n, v in parts.items()})
            for k, i in enumerate(idx)]


def join_groups(groups: list[Group]) -> tuple[list[int], Rollout, list[float], dict[str, list[float]]]:
    def cat(field: str) -> list:
        return [x for gr in groups for x in getattr(gr.ro, field)]

    ro = Rollout(cat("prompt_ids"), cat("completion_ids"), cat("texts"), cat("finished"), cat("logprobs"),
                 min(gr.ro.version for gr in groups))
    return ([gr.prompt for gr in groups], ro, [x for gr in groups for x in gr.scores],
            {n: [x for gr in groups for x in gr.parts[n]] for n in groups[0].parts})


@dataclass(frozen=True, eq=False)
class GRPOBatches:
    """A ``RolloutSchedule``'s ``make_batches`` for GRPO. Per rollout: ``prompts_per_step`` prompts,
    ``group_size`` completions each, rewards, advantages, reference (and, with mu > 1, old) log-probs, as
    micro-batches of ``micro_batch_size`` completions.

    ``dynamic_sampling: drop_equal`` (DAPO, Yu et al. 2025, section 3.2): a group whose rewards are all equal has
    zero advantage under every group baseline, so it only dilutes the step. Such groups are dropped and the schedule
    draws further sets of prompts (``RolloutSchedule.sample_more``) until the rollout holds ``prompts_per_step``
    groups with signal, at most ``max_draws`` draws in all; if it is still short, it is filled up with dropped groups
    (counted in ``dynamic/fallback``) so every step has the same size. Logged: ``dynamic/dropped_share`` (the share
    of drawn groups dropped) and ``dynamic/draws``. Under torchrun each process fills its own share."""

    reward: RewardFn
    params: GRPOParams
    reference: Callable[[torch.nn.Module, Batch], torch.Tensor] | None
    top_p: float = 1.0
    chunk_size: int = 1024

    def _draw(self, schedule: RolloutSchedule, rollout: int, draw: int) -> tuple[list[int], Rollout, list[float],
                                                                                  dict[str, list[float]]]:
        p, g = self.params, self.params.group_size
        sampling = dict(max_new_tokens=p.max_new_tokens, temperature=p.temperature, top_p=self.top_p,
                        min_new_tokens=p.min_new_tokens)
        idx, ro = schedule.sample(rollout, g, **sampling) if draw == 0 else \
            schedule.sample_more(rollout, draw, g, **sampling)
        scores = schedule.score(self.reward, idx, g, ro)
        return idx, ro, scores, dict(getattr(self.reward, "parts", {}))

    def _fill(self, schedule: RolloutSchedule, rollout: int) -> tuple[list[int], Rollout, list[float],
                                                                       dict[str, list[float]], dict[str, float]]:
        """The rollout's prompt groups, their completions, rewards and reward parts, after dynamic sampling."""
        p, g = self.params, self.params.group_size
        drawn = self._draw(schedule, rollout, 0)
        if p.dynamic_sampling == "none":
            return *drawn, {}
        want, keep_fn = len(drawn[0]), GROUP_FILTERS[p.dynamic_sampling]
        kept: list[Group] = []
        dropped: list[Group] = []
        draws = 0
        while True:
            groups = split_groups(*drawn, g)
            keep = keep_fn(torch.tensor(drawn[2], dtype=torch.float64).reshape(-1, g)).tolist()
            kept += [gr for gr, ok in zip(groups, keep) if ok]
            dropped += [gr for gr, ok in zip(groups, keep) if not ok]
            draws += 1
            if len(kept) >= want or draws >= p.max_draws:
                break
            drawn = self._draw(schedule, rollout, draws)
        stats = {"dynamic/dropped_share": len(dropped) / (len(kept) + len(dropped)), "dynamic/draws": float(draws),
                 "dynamic/fallback": float(len(kept) < want)}
        return *join_groups((kept + dropped)[:want]), stats

    def __call__(self, schedule: RolloutSchedule, rollout: int) -> list[Batch]:
        p, g = self.params, self.params.group_size
        idx, ro, scores, parts, dynamic = self._fill(schedule, rollout)
        rewards = torch.tensor(scores, dtype=torch.float64)
        adv = schedule.share_of(advantages(p.advantage, schedule.gather(rewards), g, p.std))
        row_weight = TRUNCATED[p.truncated](torch.tensor(ro.finished))
        metrics = {"reward": rewards.mean(), "reward_std": rewards.reshape(-1, g).std(1, correction=0).mean(),
                   **{k: torch.tensor(v, dtype=torch.float64) for k, v in dynamic.items()},
                   **part_metrics(parts, "reward"), **schedule.rollout_metrics(idx, g, ro)}
        schedule.last_rollout = {"rollout": rollout, "prompts": idx, "texts": ro.texts, "rewards": scores}
        return score_batches(schedule, schedule.micro_batches(ro), adv, row_weight, metrics, p, self.reference,
                             self.chunk_size)


def score_batches(schedule: RolloutSchedule, batches: list[Batch], adv: torch.Tensor, row_weight: torch.Tensor,
                  metrics: dict[str, torch.Tensor], p: GRPOParams,
                  reference: Callable[[torch.nn.Module, Batch], torch.Tensor] | None,
                  chunk_size: int) -> list[Batch]:
    """Micro-batches of a rollout's completions (in order) with what GRPO's loss reads: each completion's advantage
    (``adv``, one per completion), its ``row_weight`` (unless truncated ones train), the reference and (mu > 1) old
    log-probs, and the rollout's metrics."""
    at = 0
    for b in batches:
        n = b["completion_mask"].shape[0]
        b["advantages"] = adv[at:at + n].float()
        if p.truncated != "train":
            b["row_weight"] = row_weight[at:at + n].float()
        at += n
        with torch.no_grad():
            if reference is not None:
                b["ref_logp"] = reference(schedule.model, b)
            if schedule.mu > 1:
                b["old_logp"] = token_logps(schedule.model, b, p.temperature, chunk_size)
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
           **mean_scores(reward, "eval/reward", chats, ro, rows)}
    if watch is not None:
        out.update(mean_scores(watch, "eval/watch", chats, ro, rows))
    return out
