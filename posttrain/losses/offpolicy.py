"""Train-inference mismatch: how far the sampling engine's log-probs are from the trainer's, and the truncated
importance weights that correct a policy-gradient loss for it.

An inference engine (vLLM, a server) samples completions y ~ pi_engine and reports log pi_engine(y_t). The trainer
recomputes log pi_train(y_t) with other kernels, another precision, or a newer policy version (asynchronous
rollouts). The policy gradient wants expectations under pi_train, but the samples came from pi_engine, so

    E_{y ~ pi_train}[f(y)] = E_{y ~ pi_engine}[ (pi_train(y) / pi_engine(y)) f(y) ].

The ratio can be huge where the engine under-samples a token, so it is truncated at C (truncated importance
sampling, Ionides 2008; applied to LLM RL with vLLM rollouts as TIS by Yao et al. 2025, "Your efficient RL
framework secretly brings you off-policy RL training"). Per token, or once per completion on the product of its
token ratios:
- ``token``: w_t = min(exp(logp_train_t - logp_engine_t), C), one weight per completion token;
- ``sequence``: w = min(exp(sum_t (logp_train_t - logp_engine_t)), C), one weight per completion, given to each of
  its tokens (unbiased for sequence-level objectives, higher variance);
- ``none``: w = 1.
The weights are constants of the gradient (detached): they re-weight the per-token loss, they are not trained.

Shapes as in losses.rl: per-token tensors are (N, T) with a float ``mask`` (1 on completion tokens, 0 on padding).
Imports only torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch


def logp_mismatch(train_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Per-step mismatch metrics over the completion tokens: the mean and max |logp_train - logp_engine|, and the
    k3 estimate of KL(pi_engine || pi_train) from the engine's own samples: with r = pi_train / pi_engine,
    k3 = r - 1 - log r, non-negative and unbiased for that KL (Schulman's estimator, the samples' policy first)."""
    mask = mask.to(train_logp.dtype)
    n = mask.sum().clamp(min=1)
    delta = (train_logp - engine_logp).detach()
    kl = (torch.exp(delta) - 1 - delta) * mask
    return {"mismatch/abs_mean": float((delta.abs() * mask).sum() / n),
            "mismatch/abs_max": float((delta.abs() * mask).max()) if mask.any() else 0.0,
            "mismatch/kl": float(kl.sum() / n)}


def _no_weights(log_ratio: torch.Tensor, mask: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.ones_like(log_ratio)


def _token_weights(log_ratio: torch.Tensor, mask: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.exp(log_ratio).clamp(max=cap) * mask


def _sequence_weights(log_ratio: torch.Tensor, mask: torch.Tensor, cap: float) -> torch.Tensor:
    # The sum runs in log space and is clamped there, so a long completion cannot overflow exp.
    seq = (log_ratio * mask).sum(1, keepdim=True).clamp(max=torch.log(torch.tensor(cap, dtype=log_ratio.dtype)))
    return torch.exp(seq).expand_as(log_ratio) * mask


IS_CORRECTIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "none": _no_weights, "token": _token_weights, "sequence": _sequence_weights}


def importance_weights(train_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor, kind: str = "token",
                       cap: float = 2.0) -> torch.Tensor:
    """(N, T) truncated importance weights pi_train / pi_engine (see the module docstring), detached; 0 on padding
    (1 everywhere for ``none``). ``cap`` is C, the truncation (TIS uses 2)."""
    if kind not in IS_CORRECTIONS:
        raise ValueError(f"unknown importance correction {kind!r}; known: {', '.join(IS_CORRECTIONS)}")
    if cap <= 0:
        raise ValueError(f"the truncation cap must be positive, got {cap}")
    mask = mask.to(train_logp.dtype)
    return IS_CORRECTIONS[kind]((train_logp - engine_logp).detach(), mask, cap)


@dataclass(frozen=True)
class Correction:
    """Which importance correction (a key of ``IS_CORRECTIONS``) and its truncation C; no defaults here
    (``config.RolloutSection`` declares them)."""
    kind: str
    cap: float


def corrected(per_token: torch.Tensor, sampling_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor,
              correction: Correction | None) -> tuple[torch.Tensor, dict[str, float]]:
    """The per-token loss re-weighted by ``importance_weights(sampling_logp, engine_logp)`` (the whole per-token
    loss, KL term included: every term is an expectation over tokens the engine sampled), and the mismatch metrics.

    ``sampling_logp`` is the trainer's log-prob of each token under the policy the rollout was sampled from (the
    old log-probs; with one step per rollout, the current ones, detached). ``correction`` None or ``none``: the loss
    is returned unchanged and only the mismatch is measured. Also reported: ``mismatch/is_weight``, the mean weight
    over completion tokens, and ``mismatch/is_capped``, the share of tokens (``token``) or completions
    (``sequence``) whose weight was cut at C."""
    metrics = logp_mismatch(sampling_logp, engine_logp, mask)
    if correction is None or correction.kind == "none":
        return per_token, metrics
    w = importance_weights(sampling_logp, engine_logp, mask, correction.kind, correction.cap)
    m = mask.to(w.dtype)
    n = m.sum().clamp(min=1)
    metrics["mismatch/is_weight"] = float((w * m).sum() / n)
    log_ratio = (sampling_logp - engine_logp).detach() * m
    log_cap = math.log(correction.cap)
    if correction.kind == "sequence":
        rows = (m.sum(1) > 0)
        metrics["mismatch/is_capped"] = float(((log_ratio.sum(1) > log_cap) & rows).sum() / rows.sum().clamp(min=1))
    else:
        metrics["mismatch/is_capped"] = float(((log_ratio > log_cap) & (m > 0)).sum() / n)
    return per_token * w.to(per_token.dtype), metrics
