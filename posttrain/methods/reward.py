"""Reward models: the backbone with a scalar head on each sequence's last token, trained with Bradley-Terry.

Batches are the packed preference batches of ``data.collate.collate_pairs``; a sequence's score s is the
``models.heads.ScoreModel`` head (hidden -> 1, zero-initialised, so every pair starts at loss ln 2) on the hidden
state of its last trained token (the response's end-of-turn), never at padding, so left/right padding and packing
give the same score. Per pair (Bradley & Terry 1952; Ouyang et al. 2022 eq. 1; ``losses.bradley_terry``):

  loss = -log sigmoid(s_w - s_l - margin + length_coef * (|y_w| - |y_l|) / 100)

with |y| the response's trained tokens. The loss unit is a pair: the loop divides the step's summed loss by its
number of pairs. Accuracy counts a tie as 0.5.
"""

from __future__ import annotations

import math

import torch

from posttrain.losses import bradley_terry
from posttrain.methods.dpo import pair_accuracy
from posttrain.models.forward import Batch, evaluating
from posttrain.models.heads import ScoreModel


class RewardBT:
    """Bradley-Terry training of a ScoreModel; the loss unit is a pair."""

    name = "reward"
    loss_parts = None  # one part: loss_sum (engine.loop.Method)

    def __init__(self, margin: float = 0.0, length_coef: float = 0.0):
        self.margin, self.length_coef = margin, length_coef

    def count(self, batch: Batch) -> int:
        return int(batch["pair_index"].numel())

    def pair_terms(self, model: ScoreModel, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.terms(*model(batch))

    def terms(self, scores: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-pair loss and metrics from the scores and lengths of sequences in (chosen, rejected) order."""
        c, r = scores[0::2], scores[1::2]
        lengths = lengths.float()
        loss = bradley_terry(c, r, self.margin, lengths[0::2], lengths[1::2], self.length_coef)
        return loss, {"accuracy": pair_accuracy(c, r), "score/chosen": c.detach(), "score/rejected": r.detach(),
                      "score/margin": (c - r).detach()}

    def loss_sum(self, model: ScoreModel, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        loss, terms = self.pair_terms(model, batch)
        return loss.sum(), {k: float(v.mean()) for k, v in terms.items()}


def pearson(x: list[float], y: list[float]) -> float:
    n = len(x)
    if n < 2:
        return float("nan")
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def reward_eval(model: ScoreModel, method: RewardBT, batches: list[Batch], prefix: str = "eval") -> dict[str, float]:
    """Pairwise accuracy and loss on held-out pairs, the score distribution, and score-length correlation."""
    losses, acc, scores, lengths, chosen, rejected = [], [], [], [], [], []
    with evaluating(model):
        for b in batches:
            s, n = model(b)
            loss, terms = method.terms(s, n)
            losses += loss.tolist()
            acc += terms["accuracy"].tolist()
            scores += s.tolist()
            lengths += n.float().tolist()
            chosen += s[0::2].tolist()
            rejected += s[1::2].tolist()
    t = torch.tensor(scores)
    return {f"{prefix}/loss": sum(losses) / len(losses), f"{prefix}/accuracy": sum(acc) / len(acc),
            f"{prefix}/score_mean": float(t.mean()), f"{prefix}/score_std": float(t.std()) if len(t) > 1 else 0.0,
            f"{prefix}/score_chosen": sum(chosen) / len(chosen),
            f"{prefix}/score_rejected": sum(rejected) / len(rejected),
            f"{prefix}/score_p10": float(t.quantile(0.1)), f"{prefix}/score_p90": float(t.quantile(0.9)),
            f"{prefix}/length_corr": pearson(scores, lengths)}
