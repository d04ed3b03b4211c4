"""KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"): an unpaired loss.

Each row is one (prompt, completion) labelled desirable or undesirable, so it does not fit ``PairLogps``. The loss
compares the row's implied reward r = log pi(y|x) - log ref(y|x) with a reference point z0, an estimate of
KL(pi || ref) taken from the same batch with every prompt given another row's completion (``mismatched_order``,
``kto_z0``). All log-probs are summed over the completion's tokens, as in the paper and TRL's KTOTrainer.
"""

from __future__ import annotations

import torch


def mismatched_order(n: int) -> list[int]:
    """The completion each row's prompt is paired with to estimate z0: row i takes row i-1's (row 0 takes the
    last), a rotation by one within the batch, as TRL's KTOTrainer builds ``KL_completion_ids``.

    z0 stands for the KL between the policy and the reference on completions that are not the labelled answer to
    the prompt, so no row may keep its own completion (it would be the row's reward, which the loss itself moves);
    a rotation moves every row and uses each completion exactly once, so the mismatched completions are the same
    set as the batch's own (the paper's advice). A batch of one has nothing to pair with and is an error."""
    if n < 2:
        raise ValueError(f"KTO's reference point needs at least 2 rows in a batch, got {n}")
    return [n - 1, *range(n - 1)]


def kto_z0(policy_mismatched: torch.Tensor, ref_mismatched: torch.Tensor) -> torch.Tensor:
    """The reference point (Ethayarajh et al. 2024, eq. 8 and sec. 4.1): z0 = max(0, mean_i (log pi(y'_i|x_i) -
    log ref(y'_i|x_i))), over the batch's mismatched pairs (x_i, y'_i) from ``mismatched_order``, all (batch,)
    summed completion log-probs; returns a 0-d tensor.

    Detached, as in the paper and TRL: z0 is a baseline, and back-propagating through it would let the policy
    lower its loss by moving unrelated completions. The clamp at 0 holds because a KL is not negative; the
    estimate from a few rows can be."""
    return (policy_mismatched - ref_mismatched).mean().detach().clamp(min=0.0)


def kto_loss(policy: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor, z0: torch.Tensor | float,
             beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al. 2024, sec. 4.1, eq. 8; TRL's comment numbers it eq. 7), per row:
    lambda_D (1 - sigmoid(beta (r - z0))) for a desirable row, lambda_U (1 - sigmoid(beta (z0 - r))) for an
    undesirable one, r = log pi(y|x) - log ref(y|x).

    ``policy`` and ``ref`` are (batch,) summed completion log-probs, ``desirable`` a (batch,) bool, ``z0`` the
    reference point from ``kto_z0`` (detached here too, so a z0 built another way cannot carry a gradient);
    the weights are lambda_D and lambda_U (TRL's desirable_weight and undesirable_weight, default 1). Returns
    (loss per row, reward per row), rows in their given order (TRL concatenates the desirable rows before the
    undesirable ones); the reward is beta * r, as TRL logs it."""
    r = policy - ref
    z = torch.as_tensor(z0, dtype=r.dtype, device=r.device).detach()
    d = desirable.to(torch.bool)
    margin = beta * torch.where(d, r - z, z - r)
    weight = torch.where(d, torch.full_like(r, desirable_weight), torch.full_like(r, undesirable_weight))
    return weight * (1.0 - torch.sigmoid(margin)), (beta * r).detach()
