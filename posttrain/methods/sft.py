"""Supervised fine-tuning: token cross-entropy on trained (assistant) tokens only.

A batch is packed rows from ``data.collate.collate``; a token is trained when its label is not IGNORE (the
assistant turns the chat template marks). The step's loss is

  sum over trained tokens t of -log softmax(logits_{t-1})[x_t]  /  the step's number of trained tokens

(all micro-batches and ranks: the loop divides the summed loss by the summed ``count``), so it is the same token
mean however the step is split into micro-batches, accumulation steps or packed rows. With a plain LM head the
head runs only on trained positions, a chunk at a time (``losses.linear_cross_entropy_sum``).

``kl_to_base`` = c > 0 (LoRA only) adds c * KL(model || base) per trained token, the exact full-vocabulary KL of
the next-token distributions, the base being the same model with its adapters disabled (one no-grad forward, no
second copy of the weights); ``kl_to_base`` in the metrics is that KL's mean per trained token.
"""

from __future__ import annotations

import torch

from posttrain.data.collate import num_targets
from posttrain.losses import linear_cross_entropy_sum, linear_kl_sum, token_cross_entropy_sum, token_kl_sum
from posttrain.models.forward import Batch, model_inputs, plain_head

__all__ = ["SFT", "completion_loss_sum", "kl_regularised_loss_sum"]


def completion_loss_sum(model: torch.nn.Module, batch: Batch, chunk_size: int = 1024) -> torch.Tensor:
    """Sum of cross-entropy over trained tokens of a (B, T) batch (see data.collate.collate)."""
    inner, kwargs, targets, keep = model_inputs(model, batch)
    head = plain_head(inner)
    if head is None:  # generic path: full logits, then select
        logits = inner(**kwargs).logits[:, :-1]
        return token_cross_entropy_sum(logits[keep], targets[keep])
    hidden = inner.get_decoder()(**kwargs).last_hidden_state
    return linear_cross_entropy_sum(hidden[:, :-1][keep], head.weight, targets[keep], chunk_size)


def kl_regularised_loss_sum(model: torch.nn.Module, batch: Batch, kl_coef: float,
                            chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum CE + kl_coef * sum KL(model || base), sum KL) over trained tokens, where the base is the same PEFT
    model with its adapters switched off: the regulariser against forgetting costs one no-grad forward and no
    second copy of the weights."""
    inner, kwargs, targets, keep = model_inputs(model, batch)
    head = plain_head(inner)

    def outputs(m: torch.nn.Module) -> torch.Tensor:  # trained positions' hidden states, or logits without a plain head
        if head is None:
            return m(**kwargs).logits[:, :-1][keep]
        return m.get_decoder()(**kwargs).last_hidden_state[:, :-1][keep]

    with torch.no_grad(), model.disable_adapter():
        ref = outputs(inner)
    out = outputs(inner)
    if head is None:
        ce, kl = token_cross_entropy_sum(out, targets[keep]), token_kl_sum(out, ref)
    else:
        ce = linear_cross_entropy_sum(out, head.weight, targets[keep], chunk_size)
        kl = linear_kl_sum(out, ref, head.weight, chunk_size)
    return ce + kl_coef * kl, kl.detach()


class SFT:
    """A method is how to count a batch's loss units and how to compute its summed loss.

    ``kl_to_base`` > 0 adds that multiple of KL(model || adapter-off base) per trained token (LoRA only)."""

    name = "sft"
    loss_parts = None  # one part: loss_sum (engine.loop.Method)

    def __init__(self, chunk_size: int = 1024, kl_to_base: float = 0.0):
        self.chunk_size, self.kl_to_base = chunk_size, kl_to_base

    def count(self, batch: Batch) -> int:
        return num_targets(batch)

    def loss_sum(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        if not self.kl_to_base:
            return completion_loss_sum(model, batch, self.chunk_size), {}
        loss, kl = kl_regularised_loss_sum(model, batch, self.kl_to_base, self.chunk_size)
        return loss, {"kl_to_base": float(kl) / max(num_targets(batch), 1)}
