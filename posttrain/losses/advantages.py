"""Advantage estimators for critic-free online RL, as named functions in a table (``ADVANTAGES``).

Each maps one rollout's rewards (N,), N = prompts x G with the G completions of a prompt consecutive, to one
advantage per completion (N,), which every token of that completion gets. They differ in the baseline subtracted
and in what the difference is divided by:

- ``grpo`` (Shao et al. 2024, DeepSeekMath eq. 3 in section 4.1.2): A_i = (r_i - mean(r)) / (std(r) + eps) within
  the group. DeepSeekMath writes std(r) without saying which one; ``std`` picks it (``STD_NORMS``):
  ``sample`` (divide by G - 1, what TRL's ``nanstd`` and verl's ``torch.std`` compute, and the default here so that a
  kl_coef or clip_eps tuned in either means the same here), ``population`` (divide by G; at G = 4 its advantages are
  sqrt(4/3) = 1.155x the sample ones) or ``none``.
- ``dr_grpo`` (Liu et al. 2025, "Understanding R1-Zero-like training", eq. 3): A_i = r_i - mean(r), no std: the std
  up-weights questions whose rewards barely vary (too easy or too hard), a difficulty bias. As published it also
  drops the per-completion length normalisation: its default aggregation is ``dr_grpo`` (``losses.reduce``).
- ``rloo`` (Ahmadian et al. 2024, "Back to basics", eq. 6; Kool et al. 2019): the baseline of completion i is the
  mean of the other G - 1 rewards, A_i = r_i - (sum_j r_j - r_i) / (G - 1) = G / (G - 1) * (r_i - mean(r)). No std.
- ``reinforce_pp`` (Hu et al. 2025, REINFORCE++ eq. 7-8, with the outcome reward given to every token and
  gamma = 1): the baseline is the whole rollout's mean and the result is divided by the rollout's std,
  A_i = (r_i - mean_batch(r)) / (std_batch(r) + eps): no group structure, so it also suits G = 1-like prompts.
- ``reinforce_pp_baseline`` (the same paper's "REINFORCE++-baseline" for reasoning tasks): the group mean is
  subtracted first, then the result is divided by the rollout's std of those differences.
Batch statistics are over completions (each completion counts once, whatever its length) and use the sample std.
A group whose rewards are all equal gets A = 0 from every estimator that subtracts the group mean.

Imports only torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


def _sample_std(x: torch.Tensor) -> torch.Tensor:
    return x.std(-1, correction=1, keepdim=True) if x.shape[-1] > 1 else torch.zeros_like(x[..., :1])


def _population_std(x: torch.Tensor) -> torch.Tensor:
    return x.std(-1, correction=0, keepdim=True)


def _no_std(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x[..., :1])


# What the centred rewards are divided by: std + eps (``none``: 0 + eps is not applied, the division is skipped).
STD_NORMS: dict[str, Callable[[torch.Tensor], torch.Tensor] | None] = {
    "sample": _sample_std, "population": _population_std, "none": None}


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.reshape(-1, group_size).double()


def _scaled(centred: torch.Tensor, raw: torch.Tensor, std: str, eps: float) -> torch.Tensor:
    if std not in STD_NORMS:
        raise ValueError(f"unknown std {std!r}; known: {', '.join(STD_NORMS)}")
    fn = STD_NORMS[std]
    return centred if fn is None else centred / (fn(raw) + eps)


def grpo_advantages(rewards: torch.Tensor, group_size: int, std: str = "sample", eps: float = 1e-6) -> torch.Tensor:
    """A_i = (r_i - mean_G(r)) / (std_G(r) + eps) per group of ``group_size`` consecutive completions."""
    g = _groups(rewards, group_size)
    return _scaled(g - g.mean(1, keepdim=True), g, std, eps).reshape(-1).to(rewards.dtype)


def dr_grpo_advantages(rewards: torch.Tensor, group_size: int, std: str = "none", eps: float = 1e-6) -> torch.Tensor:
    """A_i = r_i - mean_G(r): Dr. GRPO's advantage, no std."""
    return grpo_advantages(rewards, group_size, "none", eps)


def rloo_advantages(rewards: torch.Tensor, group_size: int, std: str = "none", eps: float = 1e-6) -> torch.Tensor:
    """A_i = r_i - mean of the group's other G - 1 rewards."""
    if group_size < 2:
        raise ValueError("rloo needs at least 2 completions per prompt (the baseline is the others' mean)")
    g = _groups(rewards, group_size)
    others = (g.sum(1, keepdim=True) - g) / (group_size - 1)
    return (g - others).reshape(-1).to(rewards.dtype)


def reinforce_pp_advantages(rewards: torch.Tensor, group_size: int, std: str = "sample",
                            eps: float = 1e-6) -> torch.Tensor:
    """A_i = (r_i - mean_batch(r)) / (std_batch(r) + eps) over the whole rollout."""
    r = _groups(rewards, group_size).reshape(1, -1)
    return _scaled(r - r.mean(), r, "sample", eps).reshape(-1).to(rewards.dtype)


def reinforce_pp_baseline_advantages(rewards: torch.Tensor, group_size: int, std: str = "sample",
                                     eps: float = 1e-6) -> torch.Tensor:
    """d_i = r_i - mean_G(r), then A_i = d_i / (std_batch(d) + eps) over the whole rollout."""
    g = _groups(rewards, group_size)
    d = (g - g.mean(1, keepdim=True)).reshape(1, -1)
    return _scaled(d, d, "sample", eps).reshape(-1).to(rewards.dtype)


@dataclass(frozen=True)
class Estimator:
    """An advantage estimator: ``fn(rewards, group_size, std, eps)``, whether it reads ``std`` (only ``grpo``
    does; the others fix their own normalisation) and the aggregation it was published with."""
    fn: Callable[[torch.Tensor, int, str, float], torch.Tensor]
    takes_std: bool
    aggregation: str


ADVANTAGES: dict[str, Estimator] = {
    "grpo": Estimator(grpo_advantages, True, "grpo"),
    "dr_grpo": Estimator(dr_grpo_advantages, False, "dr_grpo"),
    "rloo": Estimator(rloo_advantages, False, "grpo"),
    "reinforce_pp": Estimator(reinforce_pp_advantages, False, "grpo"),
    "reinforce_pp_baseline": Estimator(reinforce_pp_baseline_advantages, False, "grpo"),
}


def advantages(kind: str, rewards: torch.Tensor, group_size: int, std: str = "sample",
               eps: float = 1e-6) -> torch.Tensor:
    """The (N,) advantages of ``ADVANTAGES[kind]`` for one whole rollout's rewards."""
    if kind not in ADVANTAGES:
        raise ValueError(f"unknown advantage estimator {kind!r}; known: {', '.join(ADVANTAGES)}")
    return ADVANTAGES[kind].fn(rewards, group_size, std, eps)


def keep_all(rewards: torch.Tensor) -> torch.Tensor:
    return torch.ones(rewards.shape[0], dtype=torch.bool)


def drop_equal(rewards: torch.Tensor) -> torch.Tensor:
    """(P,) True for a group (a row of the (P, G) rewards) whose rewards are not all equal: DAPO's dynamic sampling
    keeps 0 < accuracy < 1 (Yu et al. 2025, eq. 11), the same condition for 0/1 rewards."""
    return (rewards != rewards[:, :1]).any(1)


# Dynamic sampling: which prompt groups of a rollout carry signal and are kept.
GROUP_FILTERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"none": keep_all, "drop_equal": drop_equal}


def train_truncated(finished: torch.Tensor) -> torch.Tensor:
    return torch.ones(finished.shape, dtype=torch.float64)


def mask_truncated(finished: torch.Tensor) -> torch.Tensor:
    """(N,) 0 for a completion cut at max_new_tokens, 1 for one that ended itself (DAPO's overlong filtering,
    section 3.4; TRL's mask_truncated_completions). A masked completion still counts in the ``grpo`` and
    ``dr_grpo`` aggregations' number of completions, as in TRL; its tokens count nowhere."""
    return finished.to(torch.float64)


# Whether completions cut at max_new_tokens carry loss: the row weight each completion gets.
TRUNCATED: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"train": train_truncated, "mask": mask_truncated}
