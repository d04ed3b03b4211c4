"""Token-level divergences between a student's and a teacher's next-token distributions, for distillation.

Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes" (GKD,
ICLR 2024), section 3 and eq. (1): the generalized Jensen-Shannon divergence with mixing weight beta,

  JSD(beta)(P || Q) = beta * KL(P || M) + (1 - beta) * KL(Q || M),    M = beta * P + (1 - beta) * Q,

with P the teacher and Q the student at one position, over the full vocabulary. The convention is TRL's
``GKDTrainer.generalized_jsd_loss``: beta = 0 is taken as the forward KL(teacher || student) and beta = 1 as the
reverse KL(student || teacher) (the paper's limits of the divergence, rescaled), in between M is formed in log
space (logsumexp of log P + log beta and log Q + log(1 - beta)); both logits are divided by ``temperature``
first.

Each function of ``DIVERGENCES`` maps (N, V) student and teacher log-probs to (N,) per-token values. A run sums
them over its trained (completion) tokens; the loop divides by the step's token count. ``linear_divergence_sum``
computes the same from hidden states and LM-head weights a chunk of positions at a time, so neither (N, V) logit
matrix exists in full.

Layer 0: imports only torch.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from posttrain.losses.cross_entropy import checkpointed_chunk_sum

Divergence = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """(N,) KL(p || q) = sum_v p (log p - log q) from (N, V) log-probs of finite logits."""
    return (logp.exp() * (logp - logq)).sum(-1)


def forward_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float = 0.0) -> torch.Tensor:
    """(N,) KL(teacher || student): mean-seeking, the student must cover every token the teacher gives mass to
    (the divergence of supervised KD on teacher outputs). ``beta`` is unused (JSD's beta = 0)."""
    return _kl(teacher_logp, student_logp)


def reverse_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """(N,) KL(student || teacher): mode-seeking, the student is penalised for mass where the teacher has little.
    ``beta`` is unused (JSD's beta = 1)."""
    return _kl(student_logp, teacher_logp)


def jsd(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """(N,) generalized JSD(beta) of GKD eq. (1): beta KL(teacher || M) + (1 - beta) KL(student || M) with
    M = beta P_teacher + (1 - beta) P_student; beta = 0 and 1 are the forward and reverse KL (TRL's convention)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd: beta must lie in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(student_logp, teacher_logp)
    if beta == 1.0:
        return reverse_kl(student_logp, teacher_logp)
    mix = torch.logaddexp(teacher_logp + math.log(beta), student_logp + math.log1p(-beta))
    return beta * _kl(teacher_logp, mix) + (1.0 - beta) * _kl(student_logp, mix)


DIVERGENCES: dict[str, Divergence] = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd}


def token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, divergence: str,
                     beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """(N,) the named divergence at each position, from (N, V) logits divided by ``temperature``, in at least
    fp32 (bf16 log-probs lose the small differences a KL is made of)."""
    fn = DIVERGENCES[divergence]
    up = torch.promote_types(student_logits.dtype, torch.float32)
    s = torch.log_softmax(student_logits.to(up) / temperature, -1)
    t = torch.log_softmax(teacher_logits.to(up) / temperature, -1)
    return fn(s, t, beta)


def divergence_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                   divergence: str, beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """Sum over masked positions of ``token_divergence``. logits: (..., V), mask: (...) of 0/1 -> scalar."""
    per_token = token_divergence(student_logits.reshape(-1, student_logits.shape[-1]),
                                 teacher_logits.reshape(-1, teacher_logits.shape[-1]), divergence, beta, temperature)
    return (per_token * mask.reshape(-1).to(per_token.dtype)).sum()


def linear_divergence_sum(hidden: torch.Tensor, teacher_hidden: torch.Tensor, weight: torch.Tensor,
                          teacher_weight: torch.Tensor, divergence: str, beta: float = 0.5, temperature: float = 1.0,
                          chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the divergence, sum of the forward KL(teacher || student) at temperature 1, detached) over N
    positions, from the student's hidden states (N, H) with its head weight (V, H) and the teacher's (N, H') with
    its own (V, H') (the same tensor when the two share a base). A chunk of positions at a time under activation
    checkpointing, so only one chunk's (rows x vocab) logits exist, and equal in value and gradients to
    ``divergence_sum(hidden @ weight.T, teacher_hidden @ teacher_weight.T, ...)``. The forward KL comes from the
    same chunk's logits, so logging it costs no second pass. No gradient reaches the teacher's side."""
    if teacher_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"student and teacher heads cover {weight.shape[0]} and {teacher_weight.shape[0]} tokens: "
                         "a divergence needs one vocabulary")
    fn = DIVERGENCES[divergence]
    teacher_weight = teacher_weight.detach()  # the teacher is a target: no gradient, even through a shared head

    def chunk(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        up = torch.promote_types(h.dtype, torch.float32)
        s_logits, t_logits = (h @ weight.t()).to(up), (t @ teacher_weight.t()).to(up)
        s, tt = torch.log_softmax(s_logits / temperature, -1), torch.log_softmax(t_logits / temperature, -1)
        value = fn(s, tt, beta).sum()
        with torch.no_grad():
            if temperature == 1.0:
                fkl = forward_kl(s, tt).sum()
            else:
                fkl = forward_kl(torch.log_softmax(s_logits, -1), torch.log_softmax(t_logits, -1)).sum()
        return torch.stack([value, fkl])

    both = checkpointed_chunk_sum(chunk, hidden, teacher_hidden.detach(), chunk_size)
    return both[0], both[1].detach()
