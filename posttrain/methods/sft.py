"""Supervised fine-tuning: token cross-entropy on trained (assistant) tokens only."""

from __future__ import annotations

import torch

from posttrain.data.packing import IGNORE, num_targets
from posttrain.losses import linear_cross_entropy_sum, linear_kl_sum, token_cross_entropy_sum, token_kl_sum
from posttrain.models.attention import Layout, segment_lengths, uses_segments
from posttrain.models.lora import unwrap

__all__ = ["SFT", "completion_loss_sum", "kl_regularised_loss_sum", "model_inputs", "unwrap"]


def _plain_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The LM head if logits are exactly hidden @ W.T (no bias, soft-capping or scaling), else None."""
    cfg = model.config
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return None
    head = model.get_output_embeddings()
    if type(head) is torch.nn.Linear and head.bias is None:
        return head
    return None


def model_inputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    """(inner model, forward kwargs, next-token targets, target mask), on the model's device."""
    inner = unwrap(model)
    device = next(inner.parameters()).device
    ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
    segments = uses_segments(inner)
    if segments:
        ids, labels, pos = _one_row(ids, labels, pos, batch.get("row_tokens"))
    targets = labels[:, 1:].to(device)
    kwargs = {"input_ids": ids.to(device), "position_ids": pos.to(device), "use_cache": False}
    if segments:
        kwargs["packed_segments"] = Layout(segment_lengths(pos))  # where each packed example lies, for its attention
    return inner, kwargs, targets, targets != IGNORE


def _one_row(ids: torch.Tensor, labels: torch.Tensor, pos: torch.Tensor,
             row_tokens: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """The rows' real tokens laid end to end in one row, padding dropped. With attention computed per example the
    row boundaries mean nothing, and every padding position would cost a full pass through the layers. No target
    crosses a join: each segment's first label is IGNORE (``collate``)."""
    if row_tokens is None or (ids.shape[0] == 1 and int(row_tokens[0]) == ids.shape[1]):
        return ids, labels, pos
    real = torch.arange(ids.shape[1], device=ids.device) < row_tokens.to(ids.device)[:, None]
    return ids[real][None], labels[real][None], pos[real][None]


def completion_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int = 1024) -> torch.Tensor:
    """Sum of cross-entropy over trained tokens of a (B, T) batch (see data.packing.collate)."""
    inner, kwargs, targets, keep = model_inputs(model, batch)
    head = _plain_head(inner)
    if head is None:  # generic path: full logits, then select
        logits = inner(**kwargs).logits[:, :-1]
        return token_cross_entropy_sum(logits[keep], targets[keep])
    hidden = inner.get_decoder()(**kwargs).last_hidden_state
    return linear_cross_entropy_sum(hidden[:, :-1][keep], head.weight, targets[keep], chunk_size)


def kl_regularised_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor], kl_coef: float,
                            chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum CE + kl_coef * sum KL(model || base), sum KL) over trained tokens, where the base is the same PEFT
    model with its adapters switched off: the regulariser against forgetting costs one no-grad forward and no
    second copy of the weights."""
    inner, kwargs, targets, keep = model_inputs(model, batch)
    head = _plain_head(inner)

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

    def __init__(self, chunk_size: int = 1024, kl_to_base: float = 0.0):
        self.chunk_size, self.kl_to_base = chunk_size, kl_to_base

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return num_targets(batch)

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        if not self.kl_to_base:
            return completion_loss_sum(model, batch, self.chunk_size), {}
        loss, kl = kl_regularised_loss_sum(model, batch, self.kl_to_base, self.chunk_size)
        return loss, {"kl_to_base": float(kl) / max(num_targets(batch), 1)}
