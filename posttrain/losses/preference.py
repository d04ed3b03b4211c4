"""Preference losses, per pair, as pure functions of sequence log-probabilities or reward scores.

Every function takes a ``PairLogps`` (summed log-probs of the response tokens of the chosen and rejected
responses under the policy, under the reference where the loss has one, and the response lengths) and returns
a (pairs,) tensor of losses plus the implicit rewards the loss defines; ``PREFERENCE_LOSSES`` is the table a
config's ``loss`` name is looked up in, each entry saying whether the loss needs a reference and lengths.
"""

from __future__ import annotations

import math
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
    orpo_lambda: float  # ORPO: weight of the odds-ratio term (the paper's lambda, TRL's ORPOConfig.beta)
    cpo_alpha: float  # CPO: weight of the chosen responses' negative log-likelihood (the BC regulariser)


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
    target instead of pushing it to infinity, so it does not overfit deterministic preferences.

    h here is the gap of SUMMED log-ratios, eq. 17 as written; it grows with response length, so the target
    1/(2 beta) is met by short and long pairs at different per-token strengths. TRL's ``loss_type="ipo"`` averages
    over tokens instead: that is ``ipo_per_token``, where the same beta means a per-token gap and is length-invariant.
    """
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


def _lengths(x: PairLogps, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if x.len_chosen is None or x.len_rejected is None:
        raise ValueError(f"{name} needs response lengths")
    return x.len_chosen, x.len_rejected


def ipo_per_token(x: PairLogps, p: PreferenceParams) -> LossOut:
    """IPO (Azar et al. 2023, eq. 17) on length-AVERAGED log-ratios, as TRL's ``loss_type="ipo"`` computes it:
    h = (pi_c - ref_c)/|y_w| - (pi_r - ref_r)/|y_l|, loss (h - 1/(2 beta))^2.

    Unlike ``ipo`` (summed log-ratios) the target 1/(2 beta) is a per-token gap, so doubling both responses' length
    with the same per-token log-ratios leaves the loss unchanged; a beta tuned for one is not right for the other.
    The rewards are beta times the per-token log-ratios, whose gap is what the loss regresses (TRL logs the summed
    ones)."""
    rc, rr = _ref(x)
    lc, lr = _lengths(x, "ipo_per_token")
    chosen = (x.policy_chosen - rc) / lc
    rejected = (x.policy_rejected - rr) / lr
    loss = (chosen - rejected - 1.0 / (2.0 * p.beta)) ** 2
    return loss, (p.beta * chosen).detach(), (p.beta * rejected).detach()


# Above this mean log-prob (P > 1 - 1e-6) log(1 - P) is capped: at P = 1 exactly, which float32 reaches when every
# token is near-certain, log(1 - P) is -inf and its gradient NaN.
_MAX_MEAN_LOGP = -1e-6


def log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(a)) for a <= 0 without cancellation (Maechler 2012, as TRL's ORPO): log(-expm1(a)) near 0,
    where 1 - exp(a) would lose its digits, and log1p(-exp(a)) below -ln 2, where -expm1(a) rounds towards 1."""
    return torch.where(a < -math.log(2.0), torch.log1p(-torch.exp(a)), torch.log(-torch.expm1(a)))


def _log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    # Straight-through cap: the value stays finite at P = 1 and the gradient still reaches the log-prob.
    a = mean_logp - (mean_logp - _MAX_MEAN_LOGP).clamp(min=0).detach()
    return a - log1mexp(a)


def orpo(x: PairLogps, p: PreferenceParams) -> LossOut:
    """ORPO (Hong et al. 2024, eq. 6-7): NLL(y_w) + lambda * L_OR, L_OR = -log sigmoid(log odds(y_w) - log odds(y_l)),
    odds(y) = P / (1 - P), log P the response's length-AVERAGED log-prob (as the paper and TRL take it).

    Reference-free: the odds ratio against the rejected response replaces the reference, and the NLL (here the
    chosen response's mean per-token NLL, per pair, as eq. 2) is the SFT step done in the same pass. lambda is
    ``orpo_lambda`` (TRL's ``ORPOConfig.beta``). TRL's NLL averages over the batch's chosen tokens, prompt
    included; the two agree when every chosen response has the same length and the prompt is not trained.
    The rewards are beta times the mean log-probs (SimPO's reward); TRL logs its own beta, lambda, times the same,
    so they agree when beta == orpo_lambda (both default 0.1), and here they do not vanish at lambda = 0."""
    lc, lr = _lengths(x, "ORPO")
    dtype = torch.promote_types(x.policy_chosen.dtype, torch.float32)  # bf16 would lose log(1 - P) near P = 1
    mean_c, mean_r = (x.policy_chosen / lc).to(dtype), (x.policy_rejected / lr).to(dtype)
    odds_ratio = -F.logsigmoid(_log_odds(mean_c) - _log_odds(mean_r))
    loss = -mean_c + p.orpo_lambda * odds_ratio
    return loss, (p.beta * mean_c).detach(), (p.beta * mean_r).detach()


def cpo(x: PairLogps, p: PreferenceParams) -> LossOut:
    """CPO (Xu et al. 2024, eq. 3-4): -log sigmoid(beta (log pi(y_w) - log pi(y_l))) + alpha * NLL(y_w).

    As TRL's CPOTrainer (``loss_type="sigmoid"``): the log-probs are SUMMED over the response, label smoothing eps
    is applied as in conservative DPO (eq. 3 at eps = 0), and the behaviour-cloning term is the chosen response's
    mean per-token NLL weighted by ``cpo_alpha`` (TRL default 1.0). TRL averages that NLL over the batch's chosen
    tokens; here it is per pair, the same when the chosen responses have equal length. Reference-free: it is DPO
    with a uniform reference (eq. 3 drops pi_ref). The rewards are beta times the summed log-probs, as TRL logs."""
    lc, _ = _lengths(x, "CPO")
    chosen, rejected = p.beta * x.policy_chosen, p.beta * x.policy_rejected
    logits = chosen - rejected
    eps = p.label_smoothing
    loss = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits) - p.cpo_alpha * x.policy_chosen / lc
    return loss, chosen.detach(), rejected.detach()


@dataclass(frozen=True)
class PreferenceLoss:
    """A loss of the table and what it needs: ``reference_free`` losses never read the reference log-probs (so a
    run needs no reference model); ``needs_lengths`` losses read the response lengths (a per-token average or
    NLL) and raise without them. Calling it calls ``fn``."""
    fn: Callable[[PairLogps, PreferenceParams], LossOut]
    reference_free: bool = False
    needs_lengths: bool = False

    def __call__(self, x: PairLogps, p: PreferenceParams) -> LossOut:
        return self.fn(x, p)


PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {
    "dpo": PreferenceLoss(dpo_sigmoid),
    "ipo": PreferenceLoss(ipo),
    "ipo_per_token": PreferenceLoss(ipo_per_token, needs_lengths=True),
    "simpo": PreferenceLoss(simpo, reference_free=True, needs_lengths=True),
    "rpo": PreferenceLoss(rpo, needs_lengths=True),
    "orpo": PreferenceLoss(orpo, reference_free=True, needs_lengths=True),
    "cpo": PreferenceLoss(cpo, reference_free=True, needs_lengths=True),
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
