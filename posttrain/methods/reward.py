"""Reward models: the backbone with a scalar head on each sequence's last token, trained with Bradley-Terry.

Batches are the packed preference batches of ``data.preference.collate_pairs``; a sequence's score is read at
its last trained token (the response's end-of-turn), never at padding, so left/right padding and packing give
the same score.
"""

from __future__ import annotations

import math

import torch

from posttrain.losses import bradley_terry
from posttrain.methods.preference import pair_accuracy, pair_hidden
from posttrain.methods.sft import unwrap

Batch = dict[str, torch.Tensor]


class ScoreModel(torch.nn.Module):
    """A causal LM's decoder (LoRA-wrapped or not) plus a (hidden -> 1) score head."""

    def __init__(self, lm: torch.nn.Module, head: torch.nn.Linear | None = None):
        super().__init__()
        self.lm = lm
        hidden = unwrap(lm).config.hidden_size
        param = next(lm.parameters())
        # Zero init: every score starts at 0, so the first loss is exactly ln 2 and no pair starts out ranked.
        self.head = head or torch.nn.Linear(hidden, 1, bias=True, device=param.device, dtype=param.dtype)
        if head is None:
            torch.nn.init.zeros_(self.head.weight)
            torch.nn.init.zeros_(self.head.bias)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and response lengths (trained tokens) of every sequence in segment order."""
        hidden = pair_hidden(self.lm, batch, decoder_only=True)
        lengths = torch.zeros(2 * int(batch["pair_index"].numel()), dtype=torch.long).index_add(
            0, batch["score_seq"], torch.ones_like(batch["score_seq"]))
        picked = hidden[batch["last_index"].to(hidden.device)]
        return self.head(picked).squeeze(-1).float(), lengths.to(hidden.device)


class RewardBT:
    """Bradley-Terry training of a ScoreModel; the loss unit is a pair."""

    name = "reward"

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


@torch.no_grad()
def reward_eval(model: ScoreModel, method: RewardBT, batches: list[Batch], prefix: str = "eval") -> dict[str, float]:
    """Pairwise accuracy and loss on held-out pairs, the score distribution, and score-length correlation."""
    was_training = model.training
    model.eval()
    losses, acc, scores, lengths, chosen, rejected = [], [], [], [], [], []
    for b in batches:
        s, n = model(b)
        loss, terms = method.terms(s, n)
        losses += loss.tolist()
        acc += terms["accuracy"].tolist()
        scores += s.tolist()
        lengths += n.float().tolist()
        chosen += s[0::2].tolist()
        rejected += s[1::2].tolist()
    model.train(was_training)
    t = torch.tensor(scores)
    return {f"{prefix}/loss": sum(losses) / len(losses), f"{prefix}/accuracy": sum(acc) / len(acc),
            f"{prefix}/score_mean": float(t.mean()), f"{prefix}/score_std": float(t.std()) if len(t) > 1 else 0.0,
            f"{prefix}/score_chosen": sum(chosen) / len(chosen), f"{prefix}/score_rejected": sum(rejected) / len(rejected),
            f"{prefix}/score_p10": float(t.quantile(0.1)), f"{prefix}/score_p90": float(t.quantile(0.9)),
            f"{prefix}/length_corr": pearson(scores, lengths)}
