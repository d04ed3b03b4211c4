"""Process reward models: the backbone with a scalar head read at the end token of every reasoning step, trained
with per-step binary cross-entropy (``losses.step_bce``; Lightman et al. 2023; Wang et al. 2024, Math-Shepherd).

Batches are ``data.steps.StepBatch``. The head (``models.heads.StepScoreModel``) is zero-initialised, so every
step starts at p = 0.5 and the first loss is exactly ln 2 whatever the labels, soft ones included. The loss unit
is a counted step (neutral steps are not counted under ``neutral: skip``): the loop divides a step's summed loss
by their number.

Held-out metrics (``prm_eval``). A step's hard label is good for label 1 or a soft label above 0.5, bad for 0 or
below 0.5; neutral steps and soft labels of exactly 0.5 have none. A step is predicted bad when p < 0.5.
- step_accuracy: the share of hard-labelled steps on the right side of p = 0.5 (p exactly 0.5 counts half).
- auroc: P(p of a good step > p of a bad step) over all (good, bad) step pairs, ties half (Mann-Whitney U);
  auroc_se: its Hanley & McNeil (1982) standard error, which takes steps as independent (steps of one solution
  are not, so it is on the small side); auroc_z = (auroc - 0.5) / auroc_se.
- first_error_accuracy: over solutions with a bad step, the share whose first step predicted bad is their first
  bad step; all_correct_accuracy: over solutions with none, the share with no step predicted bad; first_error_f1:
  the harmonic mean of the two (ProcessBench, Zheng et al. 2024).
"""

from __future__ import annotations

import itertools
import math

import torch

from posttrain.losses import counted_steps, step_bce
from posttrain.models.forward import Batch, evaluating
from posttrain.models.heads import StepScoreModel


class ProcessBCE:
    """Per-step BCE training of a StepScoreModel; the loss unit is a counted step."""

    name = "prm"
    loss_parts = None  # one part: loss_sum (engine.loop.Method)

    def __init__(self, neutral: str = "skip"):
        self.neutral = neutral

    def count(self, batch: Batch) -> int:
        return int(counted_steps(batch["step_label"], self.neutral).sum())

    def loss_sum(self, model: StepScoreModel, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(batch)
        loss, _ = step_bce(logits, batch["step_label"].to(logits.device), self.neutral)
        probs = torch.sigmoid(logits.detach()).tolist()
        hard = [hard_label(x) for x in batch["step_label"].tolist()]
        metrics = {"step_accuracy": step_accuracy(probs, hard)}
        return loss.sum(), {k: v for k, v in metrics.items() if v == v}  # a batch of neutral steps only has none


def hard_label(label: float) -> bool | None:
    """True (a good step), False (a bad one) or None (neutral, NaN, or a soft label of exactly 0.5)."""
    return None if label != label or label == 0.5 else label > 0.5


def step_accuracy(probs: list[float], hard: list[bool | None]) -> float:
    """The share of hard-labelled steps on the right side of 0.5, p = 0.5 counting half; NaN without any."""
    hits = [0.5 if p == 0.5 else float((p > 0.5) == h) for p, h in zip(probs, hard) if h is not None]
    return sum(hits) / len(hits) if hits else math.nan


def auroc(scores: list[float], good: list[bool]) -> float:
    """Exact AUROC: P(score of a good item > score of a bad one), ties counted half, from midranks (Mann-Whitney
    U / (n_good n_bad)); NaN when either class is empty."""
    n_good = sum(good)
    n_bad = len(good) - n_good
    if not n_good or not n_bad:
        return math.nan
    order = sorted(range(len(scores)), key=scores.__getitem__)
    rank_sum, i = 0.0, 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        midrank = (i + j) / 2 + 1  # 1-based ranks i+1 .. j+1 share their mean
        rank_sum += midrank * sum(good[order[k]] for k in range(i, j + 1))
        i = j + 1
    return (rank_sum - n_good * (n_good + 1) / 2) / (n_good * n_bad)


def auroc_se(a: float, n_good: int, n_bad: int) -> float:
    """Hanley & McNeil (1982, eq. 2) standard error of an AUROC ``a`` from ``n_good`` positives, ``n_bad`` negatives:
    SE^2 = (A(1-A) + (n_good-1)(Q1-A^2) + (n_bad-1)(Q2-A^2)) / (n_good n_bad), Q1 = A/(2-A), Q2 = 2A^2/(1+A)."""
    if not n_good or not n_bad or a != a:
        return math.nan
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n_good - 1) * (q1 - a * a) + (n_bad - 1) * (q2 - a * a)) / (n_good * n_bad)
    return math.sqrt(max(var, 0.0))


def first_error(probs: list[list[float]], hard: list[list[bool | None]]) -> tuple[float, float]:
    """(first_error_accuracy, all_correct_accuracy) over solutions (module docstring); NaN for an empty group."""
    hit_err = n_err = hit_ok = n_ok = 0
    for p, h in zip(probs, hard):
        truth = next((i for i, x in enumerate(h) if x is False), None)
        guess = next((i for i, x in enumerate(p) if x < 0.5), None)
        if truth is None:
            n_ok += 1
            hit_ok += guess is None
        else:
            n_err += 1
            hit_err += guess == truth
    return hit_err / n_err if n_err else math.nan, hit_ok / n_ok if n_ok else math.nan


def step_logits(model: StepScoreModel, batches: list[Batch]) -> tuple[list[list[float]], list[list[float]]]:
    """Per solution, in batch order: its steps' logits and labels (NaN for a neutral step)."""
    logits: list[list[float]] = []
    labels: list[list[float]] = []
    with evaluating(model):
        for b in batches:
            rows = zip(b["step_example"].tolist(), model(b).tolist(), b["step_label"].tolist())
            for _, group in itertools.groupby(rows, key=lambda r: r[0]):
                steps = list(group)
                logits.append([r[1] for r in steps])
                labels.append([r[2] for r in steps])
    return logits, labels


def harmonic_mean(a: float, b: float) -> float:
    return math.nan if a != a or b != b else 0.0 if a + b == 0 else 2 * a * b / (a + b)


def prm_eval(model: StepScoreModel, method: ProcessBCE, batches: list[Batch], prefix: str = "eval") -> dict[str, float]:
    """Held-out loss (as trained) and the step and solution metrics of the module docstring."""
    logits, labels = step_logits(model, batches)
    z = torch.tensor([x for zs in logits for x in zs])
    loss, counted = step_bce(z, torch.tensor([x for y in labels for x in y]), method.neutral)
    probs = [torch.sigmoid(torch.tensor(zs)).tolist() for zs in logits]
    hard = [[hard_label(x) for x in y] for y in labels]
    flat_p = [x for p in probs for x in p]
    flat_h = [h for hs in hard for h in hs]
    scored = [(p, h) for p, h in zip(flat_p, flat_h) if h is not None]
    good, bad = [p for p, h in scored if h], [p for p, h in scored if not h]
    a = auroc([p for p, _ in scored], [h for _, h in scored])
    se = auroc_se(a, len(good), len(bad))
    fe, ok = first_error(probs, hard)
    return {f"{prefix}/loss": float(loss.sum() / counted.sum()) if counted.any() else math.nan,
            f"{prefix}/step_accuracy": step_accuracy(flat_p, flat_h), f"{prefix}/auroc": a,
            f"{prefix}/auroc_se": se, f"{prefix}/auroc_z": (a - 0.5) / se if se > 0 else math.nan,
            f"{prefix}/first_error_accuracy": fe, f"{prefix}/all_correct_accuracy": ok,
            f"{prefix}/first_error_f1": harmonic_mean(fe, ok),
            f"{prefix}/p_good": sum(good) / len(good) if good else math.nan,
            f"{prefix}/p_bad": sum(bad) / len(bad) if bad else math.nan,
            f"{prefix}/steps": float(len(flat_p)), f"{prefix}/solutions": float(len(probs))}
