"""Supervised fine-tuning: token cross-entropy on trained (assistant) tokens only."""

from __future__ import annotations

import torch

from posttrain.data.packing import IGNORE, num_targets
from posttrain.losses import linear_cross_entropy_sum, token_cross_entropy_sum


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


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
    """(inner model, input ids, position ids, next-token targets, target mask), on the model's device."""
    inner = unwrap(model)
    device = next(inner.parameters()).device
    targets = batch["labels"][:, 1:].to(device)
    return inner, batch["input_ids"].to(device), batch["position_ids"].to(device), targets, targets != IGNORE


def completion_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int = 1024) -> torch.Tensor:
    """Sum of cross-entropy over trained tokens of a (B, T) batch (see data.packing.collate)."""
    inner, ids, pos, targets, keep = model_inputs(model, batch)
    head = _plain_head(inner)
    if head is None:  # generic path: full logits, then select
        logits = inner(input_ids=ids, position_ids=pos, use_cache=False).logits[:, :-1]
        return token_cross_entropy_sum(logits[keep], targets[keep])
    hidden = inner.get_decoder()(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
    return linear_cross_entropy_sum(hidden[:, :-1][keep], head.weight, targets[keep], chunk_size)


class SFT:
    """A method is how to count a batch's loss units and how to compute its summed loss."""

    name = "sft"

    def __init__(self, chunk_size: int = 1024):
        self.chunk_size = chunk_size

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return num_targets(batch)

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return completion_loss_sum(model, batch, self.chunk_size), {}
