"""Policy losses (the importance ratio and its clip) and KL estimators to the reference, as named functions in
tables (``POLICY_LOSSES``, ``KL_ESTIMATORS``). Pure functions of per-token tensors (torch only).

Shapes as in losses.rl: a batch of completions is (N, T) with a float ``mask``, 1 on completion tokens and 0 on
padding; advantages are (N,) (one per completion) or (N, T).

Policy losses, per token, as a loss to minimise (rho the importance ratio pi / pi_old):
- ``ppo_clip`` (Schulman et al. 2017, eq. 7), token-level ratio rho_t = exp(log pi(y_t) - log pi_old(y_t)):
  -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A). eps_low = eps_high is PPO's symmetric clip; a larger
  eps_high is DAPO's clip-higher (Yu et al. 2025, eq. 10: eps_low 0.2, eps_high 0.28), which lets a token whose
  probability is small rise further before the clip stops it, against entropy collapse.
- ``gspo`` (Zheng et al. 2025, GSPO eq. 5-7): one ratio per completion, the length-normalised product of its token
  ratios, s_i = exp(mean_t (log pi(y_t) - log pi_old(y_t))), clipped as above and given to every token of the
  completion. The paper's clip ranges are far narrower (3e-4 / 4e-4) because s_i is a geometric mean.
- dual clip (Ye et al. 2020, "Mastering complex control in MOBA games", eq. 5), on either: for A < 0 the loss is
  also capped at -c A (c > 1), so a token whose ratio has grown huge under a negative advantage cannot produce an
  unbounded update. As verl's ``clip_ratio_c``.
Where a clip binds, the loss is constant in log pi there: no gradient pushes the ratio further.

KL estimators of KL(pi || ref) from samples of pi (Schulman 2020, "Approximating KL divergence"), per token with
d = log ref(y_t) - log pi(y_t):
- ``k1`` = -d (unbiased, can be negative);
- ``k2`` = d^2 / 2 (biased, low variance);
- ``k3`` = exp(d) - d - 1 (unbiased, non-negative; GRPO's, DeepSeekMath eq. 4).
With ``ratio_corrected`` the estimate is multiplied by the token ratio pi / pi_old (value 1 on-policy, but
differentiable), DeepSeek-V3.2's unbiased KL (eq. 8), TRL's ``use_bias_correction_kl`` (default True in TRL
1.16). It is the default here too, because of what the gradient is: for one sampled token,
  grad k3 = (1 - ref/pi) grad log pi,   whose expectation under pi is grad KL(ref || pi), the *forward* KL;
  grad (k3 * pi/sg(pi)) = grad k3 + k3 grad log pi = (log pi - log ref) grad log pi,
whose expectation is grad KL(pi || ref), the reverse KL the objective names. (k2's plain gradient already is
(log pi - log ref) grad log pi; k1's plain gradient, grad log pi, has expectation 0.) The correction uses the token
ratio for every policy loss, GSPO included, because the unbiasedness argument is per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Clip:
    """The ratio's trust region [1 - low, 1 + high], and the dual clip c (> 1) for negative advantages, or None."""
    low: float
    high: float
    dual: float | None = None


def token_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, T) log rho_t = log pi(y_t) - log pi_old(y_t)."""
    return logp - old_logp


def sequence_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, 1) log s_i = mean over the completion's tokens of log rho_t (GSPO's sequence ratio, in log space)."""
    return ((logp - old_logp) * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)


# The ratio each policy loss clips: per token, or one per completion (broadcast to its tokens).
POLICY_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "ppo_clip": token_log_ratio, "gspo": sequence_log_ratio}


def clipped_surrogate(log_ratio: torch.Tensor, advantages: torch.Tensor,
                      clip: Clip) -> tuple[torch.Tensor, torch.Tensor]:
    """-min(rho A, clip(rho, 1 - low, 1 + high) A), with the dual clip min(., -c A) where A < 0. ``log_ratio`` is
    (N, T) or (N, 1). Returns (per-token loss, 1.0 where a clip bound the loss), both broadcast to (N, T) shape of
    the larger input."""
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    ratio = torch.exp(log_ratio)
    unclipped = -ratio * advantages
    clipped = -ratio.clamp(1 - clip.low, 1 + clip.high) * advantages
    loss = torch.maximum(unclipped, clipped)
    bound = clipped > unclipped
    if clip.dual is not None:
        capped = -clip.dual * advantages
        dual = (advantages < 0) & (loss > capped)
        loss = torch.where(dual, capped.expand_as(loss), loss)
        bound = bound | dual
    return loss, bound.to(log_ratio.dtype)


def ppo_clip_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                  clip_eps: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's symmetric token-level clip (the ``ppo_clip`` policy loss with low = high = ``clip_eps``)."""
    return clipped_surrogate(logp - old_logp, advantages, Clip(clip_eps, clip_eps))


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return logp - ref_logp


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    d = ref_logp - logp
    return torch.exp(d) - d - 1


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, old_logp: torch.Tensor, estimator: str = "k3",
               ratio_corrected: bool = True) -> torch.Tensor:
    """(N, T) per-token KL(pi || ref) estimate ``KL_ESTIMATORS[estimator]``, times pi / pi_old when
    ``ratio_corrected`` (see the module docstring for why that is the default)."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; known: {', '.join(KL_ESTIMATORS)}")
    kl = KL_ESTIMATORS[estimator](logp, ref_logp)
    return kl * torch.exp(logp - old_logp) if ratio_corrected else kl


@dataclass(frozen=True)
class PolicyGradient:
    """One policy-gradient loss: which ratio (a ``POLICY_LOSSES`` key), its clip, and the KL term (a
    ``KL_ESTIMATORS`` key, its weight and the ratio correction). No defaults: ``config.GRPOSection`` declares them."""
    policy_loss: str
    clip: Clip
    kl_coef: float
    kl_estimator: str
    kl_ratio_corrected: bool

    def __post_init__(self):
        if self.policy_loss not in POLICY_LOSSES:
            raise ValueError(f"unknown policy loss {self.policy_loss!r}; known: {', '.join(POLICY_LOSSES)}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"unknown KL estimator {self.kl_estimator!r}; known: {', '.join(KL_ESTIMATORS)}")


def policy_gradient_terms(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                          ref_logp: torch.Tensor | None,
                          pg: PolicyGradient) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(N, T) per-token loss = clipped surrogate + kl_coef * KL (no KL term without ``ref_logp``), the (N, T) clip
    indicator, and the (N, T) KL estimate (detached; None without a reference). Padding is not masked here: the
    aggregation (``losses.reduce``) multiplies by the mask."""
    log_ratio = POLICY_LOSSES[pg.policy_loss](logp, old_logp, mask)
    per_token, bound = clipped_surrogate(log_ratio, advantages, pg.clip)
    per_token, bound = per_token.expand_as(logp), bound.expand_as(logp)
    if ref_logp is None:
        return per_token, bound, None
    kl = kl_penalty(logp, ref_logp, old_logp, pg.kl_estimator, pg.kl_ratio_corrected)
    return per_token + pg.kl_coef * kl, bound, kl.detach()
