"""Process reward model loss: binary cross-entropy on a score read at the end of every reasoning step.

A PRM scores each step s of a solution with a logit z_s (p_s = sigmoid(z_s), the probability the step is good) and
is trained per step against its label y_s (Lightman et al. 2023, "Let's Verify Step by Step", sec. 2.4; Wang et al.
2024, "Math-Shepherd", eq. 3, where y_s is soft: the share of rollouts from step s that reach the right answer):

  loss_s = -(y_s log sigmoid(z_s) + (1 - y_s) log(1 - sigmoid(z_s)))

A neutral step (label NaN here; PRM800K's rating 0) is trained as ``NEUTRAL_TARGETS`` says: left out of the loss
(skip), or counted as a good (positive) or bad (negative) step. The loss unit is a counted step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# How a neutral step is trained: None leaves it out of the loss, a number is its target.
NEUTRAL_TARGETS: dict[str, float | None] = {"skip": None, "positive": 1.0, "negative": 0.0}


def counted_steps(labels: torch.Tensor, neutral: str) -> torch.Tensor:
    """(S,) bool: the steps that are in the loss (every step but a neutral one under ``skip``)."""
    if NEUTRAL_TARGETS[neutral] is None:
        return ~torch.isnan(labels)
    return torch.ones_like(labels, dtype=torch.bool)


def step_bce(logits: torch.Tensor, labels: torch.Tensor, neutral: str = "skip") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-step BCE with logits (module docstring) and which steps count.

    ``logits`` (S,) float; ``labels`` (S,) float in [0, 1], soft labels allowed, NaN for a neutral step. Returns the
    (S,) loss, 0 where a step does not count, and the (S,) bool mask of counted steps; the caller sums the loss and
    divides by the mask's sum."""
    counted = counted_steps(labels, neutral)
    fill = NEUTRAL_TARGETS[neutral]
    targets = torch.where(torch.isnan(labels), torch.full_like(labels, 0.0 if fill is None else fill), labels)
    loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    return loss * counted, counted
