"""Scalar heads on a causal LM: the reward model's score model (one score per sequence), the process reward
model's (one per step), and saving/loading a (hidden -> 1) head.

A head file is a safetensors state dict of one ``torch.nn.Linear(hidden, 1)`` (``weight`` (1, hidden), ``bias``
(1,)); reward and prm runs keep their score head beside the adapter (``runs.HEAD_FILE``), and PPO loads a reward
run's as the reward role's score head and, optionally, the critic's value head.

Layer 2 (models): imports torch, safetensors, models.forward, models.lora.
"""

from __future__ import annotations

from pathlib import Path

import torch

from posttrain.models.forward import Batch, pair_hidden
from posttrain.models.lora import unwrap


class ScoreModel(torch.nn.Module):
    """A causal LM's decoder (LoRA-wrapped or not) plus a (hidden -> 1) score head."""

    def __init__(self, lm: torch.nn.Module, head: torch.nn.Linear | None = None):
        super().__init__()
        self.lm = lm
        hidden = unwrap(lm).config.hidden_size
        param = next(lm.parameters())
        # Zero init: every score starts at 0, so the first loss is exactly ln 2 and no pair starts out ranked.
        self.head = head or torch.nn.Linear(hidden, 1, bias=True, device=param.device, dtype=param.dtype)
        if head is None:
            torch.nn.init.zeros_(self.head.weight)
            torch.nn.init.zeros_(self.head.bias)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and response lengths (trained tokens) of every sequence in segment order."""
        hidden = pair_hidden(self.lm, batch, decoder_only=True)
        lengths = torch.zeros(2 * int(batch["pair_index"].numel()), dtype=torch.long).index_add(
            0, batch["score_seq"], torch.ones_like(batch["score_seq"]))
        picked = hidden[batch["last_index"].to(hidden.device)]
        return self.head(picked).squeeze(-1).float(), lengths.to(hidden.device)


class StepScoreModel(ScoreModel):
    """A process reward model: the score head read at the end token of every step (``data.steps.StepBatch``)."""

    def forward(self, batch: Batch) -> torch.Tensor:  # type: ignore[override]
        """(S,) float logits, one per step in batch order (p = sigmoid: the probability the step is good)."""
        hidden = pair_hidden(self.lm, batch, decoder_only=True)
        return self.head(hidden[batch["step_index"].to(hidden.device)]).squeeze(-1).float()


def save_head(head: torch.nn.Linear, path: str | Path) -> None:
    """Write ``head``'s state dict to the safetensors file ``path`` (on the CPU, in the head's dtype)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(path))


def load_head(path: str | Path, dtype: torch.dtype, device: torch.device | str) -> torch.nn.Linear:
    """The (hidden -> 1) head saved at ``path``, in ``dtype`` on ``device``."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    head = torch.nn.Linear(state["weight"].shape[1], 1, dtype=dtype, device=device)
    head.load_state_dict({k: v.to(dtype) for k, v in state.items()})
    return head
