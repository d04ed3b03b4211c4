"""How per-token RL losses become a step's loss: GRPO's three aggregations, as pure functions (torch only).

Each takes a micro-batch's per-token ``loss`` (N, L), its float completion ``mask`` (N, L) (1 on completion
tokens, 0 on padding) and ``max_new`` (the sampling's max new tokens), and returns (the micro-batch's summed loss,
its loss units). The training loop adds both up over every micro-batch of the step and every rank, and divides the
one sum by the other; so a step's loss depends only on which completions it holds, not on how they are split into
micro-batches or ranks (padding contributes nothing).
"""

from __future__ import annotations

from typing import Callable

import torch

Aggregation = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, int]]


def sequence_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N,) mean of ``x`` over each row's masked tokens: row sum / row token count (a row with none gives 0)."""
    return (x * mask).sum(1) / mask.sum(1).clamp(min=1)


def aggregate_sequence(loss: torch.Tensor, mask: torch.Tensor, max_new: int) -> tuple[torch.Tensor, int]:
    """GRPO as published: each completion's token sum divided by its own length, then the step's sum of those
    divided by its number of completions. Units: completions."""
    return sequence_mean(loss, mask).sum(), int(mask.shape[0])


def aggregate_token(loss: torch.Tensor, mask: torch.Tensor, max_new: int) -> tuple[torch.Tensor, int]:
    """DAPO (Yu et al. 2025): the step's token sum divided by its number of completion tokens, so a long
    completion's tokens weigh as much as a short one's. Units: completion tokens."""
    return (loss * mask).sum(), int(mask.sum())


def aggregate_constant(loss: torch.Tensor, mask: torch.Tensor, max_new: int) -> tuple[torch.Tensor, int]:
    """Dr. GRPO (Liu et al. 2025): the step's token sum divided by ``max_new`` times its number of completions (a
    constant per completion), removing the length bias. Units: completions."""
    return (loss * mask).sum() / max_new, int(mask.shape[0])


AGGREGATIONS: dict[str, Aggregation] = {
    "grpo": aggregate_sequence, "dapo": aggregate_token, "dr_grpo": aggregate_constant}
