"""KTO (Ethayarajh et al. 2024): unpaired rows, each a prompt, one completion and a label, against a reference point.

A micro-batch (``data.collate.collate_unpaired``) holds every row twice: as its own sequence (prompt_i +
completion_i) and mismatched (prompt_i + completion_{order[i]}, ``losses.kto.mismatched_order``). Per row, from
completion log-probs summed over the completion's tokens (``completion_logps``):

  r_i = log pi(y_i|x_i) - log ref(y_i|x_i)
  z0  = max(0, mean_i (log pi(y'_i|x_i) - log ref(y'_i|x_i)))          (``losses.kto.kto_z0``, detached)
  loss_i = lambda_D (1 - sigmoid(beta (r_i - z0)))  desirable,  lambda_U (1 - sigmoid(beta (z0 - r_i)))  undesirable

The loss unit is a row: the loop divides the step's summed loss by its number of rows (all ranks).

z0 carries no gradient (the paper and TRL detach it), so the mismatched policy pass runs under ``torch.no_grad``:
the same value, without holding a second set of activations for the backward. z0 is estimated per micro-batch,
in each process on its own rows, with no all-reduce. TRL averages it over the processes (a larger sample); here
each micro-batch is the same set of rows whatever the number of processes and accumulation steps
(``data.schedule.StepSchedule``), so a run computes the same losses on 1 process or 8, and a resume that moves
between processes and accumulation (allowed by ``recipes._resume``) stays the same run; nor does the loss wait on
a collective. The price is a noisier z0 with small micro-batches: raise ``train.micro_batch_size`` rather than
the number of processes to steady it.

References (``models.reference``): the policy with its LoRA adapters disabled, or a frozen copy (full fine-tuning),
as DPO's live references. No precomputed one: the mismatched pairs change with every epoch's shuffle, so the
reference would still run on them during training.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from posttrain.data import StepSchedule, Unpaired, UnpairedBatch, collate_unpaired
from posttrain.losses.kto import kto_loss, kto_z0, mismatched_order
from posttrain.models.forward import Batch, evaluating, token_logps
from posttrain.models.reference import Reference


@dataclass
class KTOParams:
    beta: float
    desirable_weight: float  # lambda_D
    undesirable_weight: float  # lambda_U


@dataclass
class KTOTerms:
    """Per row of a micro-batch: the loss, the reward beta * r, the label, the policy's summed log-prob; and z0."""
    loss: torch.Tensor  # (N,)
    reward: torch.Tensor  # (N,) detached
    desirable: torch.Tensor  # (N,) bool
    policy: torch.Tensor  # (N,) detached
    z0: torch.Tensor  # () detached


def completion_logps(model: torch.nn.Module, batch: Batch, chunk_size: int = 1024) -> torch.Tensor:
    """(N,) log-probs of each completion of a rollout layout (``collate_rollouts``), summed over its tokens.

    Summed from ``token_logps``, as the reference's (``make_reference(per_token=True)``) are: the same additions in
    the same order, so at step 0 the policy's sums equal the reference's bit for bit and every reward is exactly 0
    (another order leaves a rounding-sized reward whose sign is noise)."""
    return token_logps(model, batch, 1.0, chunk_size).sum(-1)


def sign_agreement(reward: torch.Tensor, desirable: torch.Tensor) -> torch.Tensor:
    """1 where the reward's sign agrees with the label (above 0 for a desirable row, below for an undesirable one),
    0 where it disagrees, 0.5 at 0: at step 0 the policy is its reference and every reward is 0, which is chance."""
    agree = torch.where(desirable, reward > 0, reward < 0)
    return agree.double() + 0.5 * (reward == 0).double()


def _class_sum(values: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    return float(values[mask].sum()), float(mask.sum())


class KTOMethod:
    """KTO on ``collate_unpaired`` batches; the loss unit is a row."""

    name = "kto"
    loss_parts = None  # one part: loss_sum (engine.loop.Method)

    def __init__(self, params: KTOParams, reference: Reference, chunk_size: int = 1024):
        self.params, self.reference, self.chunk_size = params, reference, chunk_size

    def count(self, batch: UnpairedBatch) -> int:
        return int(batch["desirable"].numel())

    def _ref(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        # make_reference(per_token=True): (N, L) per-token log-probs, zero outside each completion, summed as
        # completion_logps sums the policy's
        return self.reference(model, batch).sum(-1)

    def row_terms(self, model: torch.nn.Module, batch: UnpairedBatch) -> KTOTerms:
        policy = completion_logps(model, batch["own"], self.chunk_size)
        with torch.no_grad():  # z0 is detached: no activations kept for a backward that never reaches it
            policy_mis = completion_logps(model, batch["mismatched"], self.chunk_size)
        ref = self._ref(model, batch["own"]).to(policy.dtype)
        ref_mis = self._ref(model, batch["mismatched"]).to(policy.dtype)
        z0 = kto_z0(policy_mis, ref_mis)
        desirable = batch["desirable"].to(policy.device)
        p = self.params
        loss, reward = kto_loss(policy, ref, desirable, z0, p.beta, p.desirable_weight, p.undesirable_weight)
        return KTOTerms(loss, reward, desirable, policy.detach(), z0)

    def loss_sum(self, model: torch.nn.Module,
                 batch: UnpairedBatch) -> tuple[torch.Tensor, dict[str, float | tuple[float, float]]]:
        t = self.row_terms(model, batch)
        d, u = t.desirable, ~t.desirable
        both = bool(d.any()) and bool(u.any())
        # Class means are (sum, count) pairs (engine.loop.LossPart): a micro-batch may hold one class only. The
        # margin is the gap within a micro-batch (the same z0 on both sides), averaged over those with both classes.
        margin = (float(t.reward[d].mean() - t.reward[u].mean()), 1.0) if both else (0.0, 0.0)
        metrics: dict[str, float | tuple[float, float]] = {
            "kl": float(t.z0), "accuracy": float(sign_agreement(t.reward, d).mean()),
            "rewards/desirable": _class_sum(t.reward, d), "rewards/undesirable": _class_sum(t.reward, u),
            "rewards/margin": margin,
            "logps/desirable": _class_sum(t.policy, d), "logps/undesirable": _class_sum(t.policy, u)}
        return t.loss.sum(), metrics


def kto_batches(rows: list[Unpaired], batch_size: int, pad_id: int, max_seq_len: int) -> list[UnpairedBatch]:
    """Fixed batches (held-out evaluation), in length order so little is padded; a last batch of one row joins the
    one before it, since z0 needs another row's completion."""
    if len(rows) < 2:
        raise ValueError(f"KTO needs at least 2 rows to batch (its reference point pairs rows), got {len(rows)}")
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    chunks = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    if len(chunks[-1]) == 1:
        last = chunks.pop()
        chunks[-1] += last
    return [collate_unpaired([rows[i] for i in c], mismatched_order(len(c)), pad_id, max_seq_len) for c in chunks]


def _collate_units(units: list[list[Unpaired]], *, pad_id: int, max_seq_len: int) -> UnpairedBatch:
    rows = [r for unit in units for r in unit]
    return collate_unpaired(rows, mismatched_order(len(rows)), pad_id, max_seq_len)


def kto_schedule(rows: list[Unpaired], *, micro_batch_size: int, grad_accum: int, seed: int, pad_id: int,
                 max_seq_len: int, world_size: int = 1, rank: int = 0) -> StepSchedule[UnpairedBatch]:
    """Training batches: one row a unit, unpacked, so a micro-batch (the set z0 is estimated on) holds exactly
    ``micro_batch_size`` rows, the same ones on any number of processes."""
    fn = functools.partial(_collate_units, pad_id=pad_id, max_seq_len=max_seq_len)
    return StepSchedule([[r] for r in rows], fn, micro_batch_size=micro_batch_size, grad_accum=grad_accum, seed=seed,
                        world_size=world_size, rank=rank, unit_name="rows")


def kto_eval(model: torch.nn.Module, method: KTOMethod, batches: list[UnpairedBatch],
             prefix: str = "eval") -> dict[str, float]:
    """Held-out loss, z0 and sign-agreement accuracy per row; each class's mean reward over all its rows, and their
    margin (a class with no held-out row has no mean)."""
    sums = {"loss": 0.0, "kl": 0.0, "accuracy": 0.0}
    cls = {"desirable": [0.0, 0.0], "undesirable": [0.0, 0.0]}
    n = 0
    with evaluating(model):
        for b in batches:
            t = method.row_terms(model, b)
            rows = t.loss.numel()
            n += rows
            sums["loss"] += float(t.loss.sum())
            sums["kl"] += float(t.z0) * rows  # row-weighted, as the other terms
            sums["accuracy"] += float(sign_agreement(t.reward, t.desirable).sum())
            for name, mask in (("desirable", t.desirable), ("undesirable", ~t.desirable)):
                cls[name][0] += float(t.reward[mask].sum())
                cls[name][1] += float(mask.sum())
    out = {f"{prefix}/{k}": v / max(n, 1) for k, v in sums.items()}
    means = {name: s / c for name, (s, c) in cls.items() if c}
    out.update({f"{prefix}/rewards/{name}": v for name, v in means.items()})
    if len(means) == 2:
        out[f"{prefix}/rewards/margin"] = means["desirable"] - means["undesirable"]
    return out
