"""Preference losses, per pair, as pure functions of sequence log-probabilities or reward scores.

Every function takes a ``PairLogps`` (summed log-probs of the response tokens of the chosen and rejected
responses under the policy, under the reference where the loss has one, and the response lengths) and returns
a (pairs,) tensor of losses plus the implicit rewards the loss defines; ``PREFERENCE_LOSSES`` is the table a
config's ``loss`` name is looked up in, each entry saying whether the loss needs a reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class PairLogps:
    """Per pair, all (batch,): summed response log-probs under the policy and the reference, response lengths."""
    policy_chosen: torch.Tensor  # (batch,)
    policy_rejected: torch.Tensor  # (batch,)
    ref_chosen: torch.Tensor | None = None  # (batch,); None for a reference-free loss
    ref_rejected: torch.Tensor | None = None  # (batch,)
    len_chosen: torch.Tensor | None = None  # (batch,) scored tokens of the chosen response
    len_rejected: torch.Tensor | None = None  # (batch,)


@dataclass
class PreferenceParams:
    """The preference losses' settings; their defaults are declared once, in ``posttrain.config.DPOSection``."""
    beta: float
    label_smoothing: float  # conservative DPO: the probability that a label is flipped
    gamma: float  # SimPO's target reward margin
    rpo_alpha: float  # RPO: weight of the chosen responses' negative log-likelihood


LossOut = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (loss per pair, chosen reward, rejected reward)


def _ref(x: PairLogps) -> tuple[torch.Tensor, torch.Tensor]:
    if x.ref_chosen is None or x.ref_rejected is None:
        raise ValueError("this loss needs reference log-probs")
    return x.ref_chosen, x.ref_rejected


def dpo_sigmoid(x: PairLogps, p: PreferenceParams) -> LossOut:
    """DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(beta * h), h = log pi/ref (chosen) - log pi/ref (rejected).

    With label smoothing eps (Mitchell 2023, "conservative DPO") the loss is the expectation over a label that is
    wrong with probability eps: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).
    """
    rc, rr = _ref(x)
    chosen = p.beta * (x.policy_chosen - rc)
    rejected = p.beta * (x.policy_rejected - rr)
    logits = chosen - rejected
    eps = p.label_smoothing
    loss = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
    return loss, chosen.detach(), rejected.detach()


def ipo(x: PairLogps, p: PreferenceParams) -> LossOut:
    """IPO (Azar et al. 2023, eq. 17): (h - 1/(2 tau))^2 with tau = beta; it regresses the log-ratio gap onto a fixed
    target instead of pushing it to infinity, so it does not overfit deterministic preferences."""
    rc, rr = _ref(x)
    h = (x.policy_chosen - rc) - (x.policy_rejected - rr)
    loss = (h - 1.0 / (2.0 * p.beta)) ** 2
    return loss, (p.beta * (x.policy_chosen - rc)).detach(), (p.beta * (x.policy_rejected - rr)).detach()


def simpo(x: PairLogps, p: PreferenceParams) -> LossOut:
    """SimPO (Meng et al. 2024, eq. 6): -log sigmoid(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma).

    Reference-free: the reward is the length-normalised log-prob, and gamma is a target margin.
    """
    if x.len_chosen is None or x.len_rejected is None:
        raise ValueError("SimPO needs response lengths")
    chosen = p.beta * x.policy_chosen / x.len_chosen
    rejected = p.beta * x.policy_rejected / x.len_rejected
    loss = -F.logsigmoid(chosen - rejected - p.gamma)
    return loss, chosen.detach(), rejected.detach()


def rpo(x: PairLogps, p: PreferenceParams) -> LossOut:
    """DPO plus alpha * the chosen response's per-token negative log-likelihood (Pang et al. 2024, "Iterative
    Reasoning Preference Optimization", eq. 1; Liu et al. 2024 call it RPO). Plain DPO can raise the margin by
    lowering both log-probs, the rejected one faster; the NLL term keeps the chosen response likely, so a
    fine-tuned format (e.g. stopping after the answer) survives the preference step."""
    if x.len_chosen is None:
        raise ValueError("RPO needs response lengths")
    loss, chosen, rejected = dpo_sigmoid(x, p)
    return loss - p.rpo_alpha * x.policy_chosen / x.len_chosen, chosen, rejected


@dataclass(frozen=True)
class PreferenceLoss:
    """A loss of the table and what it needs: ``reference_free`` losses never read the reference log-probs (so a
    run needs no reference model). Calling it calls ``fn``."""
    fn: Callable[[PairLogps, PreferenceParams], LossOut]
    reference_free: bool = False

    def __call__(self, x: PairLogps, p: PreferenceParams) -> LossOut:
        return self.fn(x, p)


PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {
    "dpo": PreferenceLoss(dpo_sigmoid),
    "ipo": PreferenceLoss(ipo),
    "simpo": PreferenceLoss(simpo, reference_free=True),
    "rpo": PreferenceLoss(rpo),
}


def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0,
                  len_chosen: torch.Tensor | None = None, len_rejected: torch.Tensor | None = None,
                  length_coef: float = 0.0) -> torch.Tensor:
    """Reward-model loss (Bradley & Terry 1952; Ouyang et al. 2022 eq. 1): -log sigmoid(r_c - r_r - m).

    ``margin`` m asks for a gap of at least m (Llama 2's graded-preference margin). ``length_coef`` c adds a fixed
    term c * (len_c - len_r) / 100 to the logit that explains the part of a preference a length difference
    predicts, so the score itself need not learn "longer is better" (in the spirit of ODIN, Chen et al. 2024).
    """
    logits = chosen - rejected - margin
    if length_coef:
        if len_chosen is None or len_rejected is None:
            raise ValueError("length_coef needs response lengths")
        logits = logits + length_coef * (len_chosen - len_rejected) / 100.0
    return -F.logsigmoid(logits)
