"""The reference model of DPO and GRPO: what it is, and the one choice of it.

With LoRA the reference is the policy with its adapters disabled (no copy): the base weights the adapters were
added to. Full fine-tuning changes those weights themselves, so it needs a frozen copy taken before training.
A reference computed once before training (``methods.dpo.precompute_reference``) is looked up by pair index.

Layer 2 (models): imports torch, models.forward.
"""

from __future__ import annotations

import copy
from typing import Callable, Protocol

import torch

from posttrain.models.forward import Batch, sequence_logps, token_logps

LogpsFn = Callable[[torch.nn.Module, Batch], torch.Tensor]


class Reference(Protocol):
    """Reference log-probs of a batch, given the policy: (2P,) per sequence of a pair batch, or (N, L) per token."""

    def __call__(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor: ...


class AdapterOffReference:
    """The policy with its LoRA adapters disabled: the base weights it started from, no second copy. ``logps``
    says what to compute (default: per-sequence response log-probs; GRPO passes per-token ones)."""

    def __init__(self, chunk_size: int = 1024, logps: LogpsFn | None = None):
        self.logps = logps or (lambda m, b: sequence_logps(m, b, chunk_size)[0])

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        with model.disable_adapter():
            return self.logps(model, batch)


class FrozenCopyReference:
    """A frozen copy of the model taken before training (full fine-tuning changes the weights themselves)."""

    def __init__(self, model: torch.nn.Module, chunk_size: int = 1024, logps: LogpsFn | None = None):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.logps = logps or (lambda m, b: sequence_logps(m, b, chunk_size)[0])

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return self.logps(self.model, batch)


class PolicyAsReference:
    """The policy as it is now, no copy: a reference only while the policy still equals it, i.e. before the first
    optimizer step (what ``precompute_reference`` runs under full fine-tuning)."""

    def __init__(self, logps: LogpsFn):
        self.logps = logps

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return self.logps(model, batch)


class PrecomputedReference:
    """Reference log-probs looked up by pair index: (pairs, 2) = (chosen, rejected) per pair."""

    def __init__(self, table: torch.Tensor):
        self.table = table

    def __call__(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        rows = self.table[batch["pair_index"]]
        return rows.reshape(-1).to(next(model.parameters()).device)


def make_reference(model: torch.nn.Module, *, lora: bool, per_token: bool = False, chunk_size: int = 1024,
                   temperature: float = 1.0, before_training: bool = False) -> Reference:
    """The reference for the policy ``model``: with LoRA the reference is the policy with its adapters disabled (no
    copy); full fine-tuning needs a frozen copy (taken here, so call this before training starts).

    What it computes: DPO's (2P,) summed response log-probs of a pair batch (``models.forward.sequence_logps``),
    or with ``per_token`` GRPO's (N, L) log-probs of sampled tokens under logits / ``temperature``
    (``token_logps``). ``before_training``: the reference only runs before the first optimizer step (it is
    precomputed), while the policy still equals it, so full fine-tuning needs no copy either."""
    if per_token:
        def logps(m: torch.nn.Module, b: Batch) -> torch.Tensor:
            return token_logps(m, b, temperature, chunk_size)
    else:
        def logps(m: torch.nn.Module, b: Batch) -> torch.Tensor:
            return sequence_logps(m, b, chunk_size)[0]
    if lora:
        return AdapterOffReference(logps=logps)
    return PolicyAsReference(logps) if before_training else FrozenCopyReference(model, logps=logps)
