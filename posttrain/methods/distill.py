"""On-policy distillation (GKD; Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from
Self-Generated Mistakes"): the student is trained to match the teacher's next-token distribution at every token of
a sequence, the sequences being, per rollout, either the student's own samples (on-policy, a share ``lmbda`` of
the rollouts, as TRL's GKDConfig.lmbda) or off-policy ones: the data's answers or the teacher's samples.

Per completion token t (prompt tokens carry no loss), with s and p the student's and teacher's distributions
under logits / temperature:

  loss = sum_t D(s_t, p_t)  /  the step's number of completion tokens

D is ``losses.distill.DIVERGENCES[divergence]``: forward_kl, reverse_kl or the generalized JSD(beta). As in GKD the
samples are not differentiated through (the divergence's gradient at fixed sequences). The teacher runs under
no_grad; its hidden states and the student's meet in ``losses.linear_divergence_sum``, a chunk of positions at a
time, so no (tokens x vocab) matrix exists in full. Every step logs ``divergence`` and ``kl``, the forward
KL(teacher || student) per token at temperature 1 whatever D is, and ``on_policy`` (1 for the student's samples).

Which kind a rollout is follows from (seed, rollout number) alone, and samples are seeded per prompt, so a resumed
run draws what the uninterrupted one drew.

Layer 5 (methods): imports losses, models, rollout.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from posttrain.data.collate import collate_rollouts
from posttrain.losses.cross_entropy import target_logps
from posttrain.losses.distill import divergence_sum, linear_divergence_sum
from posttrain.models.forward import Batch, evaluating
from posttrain.models.teacher import Teacher, scored_outputs
from posttrain.rollout.sample import sample_completions
from posttrain.rollout.schedule import RolloutSchedule, generation_batch


@dataclass
class DistillParams:
    """The ``distill`` section as plain values; no defaults here (``config.DistillSection`` declares them)."""
    divergence: str
    beta: float
    temperature: float
    lmbda: float
    off_policy: str
    max_new_tokens: int
    sample_temperature: float
    top_p: float


def is_on_policy(seed: int, rollout: int, lmbda: float) -> bool:
    """Whether rollout ``rollout`` is the student's own samples: a draw seeded by (seed, rollout) alone."""
    return random.Random(f"{seed}/distill/{rollout}").random() < lmbda


def divergence_of(student: tuple[torch.Tensor, torch.Tensor | None], teacher: tuple[torch.Tensor, torch.Tensor | None],
                  divergence: str, beta: float, temperature: float,
                  chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed divergence, summed forward KL at temperature 1, detached) over scored positions, from each model's
    ``models.teacher.scored_outputs``: chunked from hidden states where both heads are plain, else from logits."""
    (rows, weight), (t_rows, t_weight) = student, teacher
    if weight is not None and t_weight is not None:
        return linear_divergence_sum(rows, t_rows, weight, t_weight, divergence, beta, temperature, chunk_size)
    logits = rows if weight is None else rows @ weight.t()
    t_logits = (t_rows if t_weight is None else t_rows @ t_weight.t()).detach()
    ones = torch.ones(logits.shape[0], device=logits.device)
    value = divergence_sum(logits, t_logits, ones, divergence, beta, temperature)
    return value, divergence_sum(logits.detach(), t_logits, ones, "forward_kl")


class Distill:
    """The loss of one micro-batch of sequences (prompt + completion, ``data.collate.collate_rollouts``): the
    teacher's forward (no grad, its adapter switched on when it shares the base), the student's, the divergence
    summed over completion tokens."""

    name = "distill"
    loss_parts = None  # one part: loss_sum (engine.loop.Method)

    def __init__(self, params: DistillParams, teacher: Teacher, chunk_size: int = 1024):
        self.p, self.teacher, self.chunk_size = params, teacher, chunk_size

    def count(self, batch: Batch) -> int:
        return int(batch["completion_mask"].sum())

    def loss_sum(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        with self.teacher.active() as t:  # first: with a shared base the student's adapter is back before its pass
            teacher_out = scored_outputs(t, batch)
        value, fkl = divergence_of(scored_outputs(model, batch), teacher_out, self.p.divergence, self.p.beta,
                                   self.p.temperature, self.chunk_size)
        n = float(self.count(batch))
        metrics: dict[str, Any] = {"divergence": (float(value.detach()), n), "kl": (float(fkl), n)}
        metrics.update({k: float(v) for k, v in batch.get("metrics", {}).items()})
        return value, metrics


@dataclass(frozen=True, eq=False)
class DistillBatches:
    """A ``RolloutSchedule``'s ``make_batches`` for distillation: per rollout, ``prompts_per_step`` prompts with one
    sequence each: the student's sample (on-policy), else the data's answer (``answers``, completion token ids per
    training prompt) or the teacher's sample, as micro-batches of ``micro_batch_size`` sequences."""

    params: DistillParams
    teacher: Teacher
    answers: list[list[int]] | None

    def completions(self, schedule: RolloutSchedule, rollout: int, on: bool) -> tuple[list[int], list[list[int]]]:
        """This process's prompt indices for the rollout and one completion of each."""
        p = self.params
        sampling = dict(max_new_tokens=p.max_new_tokens, temperature=p.sample_temperature, top_p=p.top_p,
                        min_new_tokens=0)
        if on:
            idx, ro = schedule.sample(rollout, 1, **sampling)
            return idx, ro.completion_ids
        idx, seeds = schedule.share(rollout)
        if p.off_policy == "dataset":
            if self.answers is None:
                raise ValueError("off_policy dataset needs the training prompts' answers")
            return idx, [self.answers[i] for i in idx]
        with self.teacher.active() as t:
            ro = sample_completions(t, schedule.tok, [schedule.prompts[i] for i in idx], n=1, seeds=seeds,
                                    batch_size=generation_batch(len(idx), schedule.micro), **sampling)
        return idx, ro.completion_ids

    def __call__(self, schedule: RolloutSchedule, rollout: int) -> list[Batch]:
        on = is_on_policy(schedule.seed, rollout, self.params.lmbda)
        idx, completions = self.completions(schedule, rollout, on)
        prompts = [schedule.prompts[i] for i in idx]
        lengths = torch.tensor([len(c) for c in completions], dtype=torch.float64)
        metrics = {"on_policy": torch.tensor(float(on)), "completion_len": lengths.mean()}
        schedule.last_rollout = {"rollout": rollout, "prompts": idx, "on_policy": on,
                                 "texts": [schedule.tok.decode(c, skip_special_tokens=True) for c in completions]}
        out = []
        for k in range(0, len(idx), schedule.micro):
            b = collate_rollouts(prompts[k:k + schedule.micro], completions[k:k + schedule.micro], schedule.pad_id,
                                 schedule.share_prompt)
            b["metrics"] = metrics
            out.append(b)
        return out


def distill_schedule(model: torch.nn.Module, tokenizer, prompts: list[list[int]], rows: list[dict[str, Any]],
                     chats: list[Any], params: DistillParams, teacher: Teacher, answers: list[list[int]] | None, *,
                     prompts_per_step: int, micro_batch_size: int, seed: int,
                     share_prompt: bool = True) -> RolloutSchedule:
    """Distillation's rollout schedule: ``RolloutSchedule`` with ``DistillBatches``, one step per rollout, the
    student sampled by posttrain's own sampler (the ``hf`` engine)."""
    return RolloutSchedule(model, tokenizer, prompts, rows, chats,
                           make_batches=DistillBatches(params, teacher, answers), prompts_per_step=prompts_per_step,
                           mu=1, micro_batch_size=micro_batch_size, seed=seed, share_prompt=share_prompt)


def teacher_answers(teacher: Teacher, tokenizer, prompts: list[list[int]], max_new_tokens: int,
                    batch_size: int) -> list[list[int]]:
    """The teacher's greedy completion (token ids, with its end-of-turn token when it finished) of each prompt."""
    with teacher.active() as t:
        ro = sample_completions(t, tokenizer, prompts, n=1, max_new_tokens=max_new_tokens, temperature=0.0,
                                batch_size=batch_size)
    return ro.completion_ids


@torch.no_grad()
def distill_eval(model: torch.nn.Module, teacher: Teacher, prompts: list[list[int]], answers: list[list[int]], *,
                 micro_batch_size: int, pad_id: int, chunk_size: int = 1024,
                 share_prompt: bool = True) -> dict[str, float]:
    """On held-out prompts and the teacher's (greedy) answers to them: ``eval/kl``, the forward KL(teacher ||
    student) per answer token, and ``eval/teacher_nll``, the student's negative log-likelihood per answer token
    (both at temperature 1)."""
    kl = nll = tokens = 0.0
    with evaluating(model):
        for k in range(0, len(prompts), micro_batch_size):
            b = collate_rollouts(prompts[k:k + micro_batch_size], answers[k:k + micro_batch_size], pad_id,
                                 share_prompt)
            with teacher.active() as t:
                teacher_out = scored_outputs(t, b)
            rows, weight = scored_outputs(model, b)
            kl += float(divergence_of((rows, weight), teacher_out, "forward_kl", 0.0, 1.0, chunk_size)[1])
            targets = b["score_target"].to(rows.device)
            up = torch.promote_types(rows.dtype, torch.float32)
            if weight is not None:
                logp = target_logps(rows, weight, targets, chunk_size, up)
            else:
                logp = torch.log_softmax(rows.to(up), -1).gather(1, targets[:, None])[:, 0]
            nll -= float(logp.sum())
            tokens += float(targets.numel())
    return {"eval/kl": kl / max(tokens, 1.0), "eval/teacher_nll": nll / max(tokens, 1.0),
            "eval/teacher_tokens": tokens}
