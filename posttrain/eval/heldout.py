"""Held-out completion loss and perplexity, and sample generations."""

from __future__ import annotations

import math

import torch

from posttrain.data.collate import num_targets
from posttrain.data.formats import Messages
from posttrain.data.tool_rows import Tools
from posttrain.methods.sft import completion_loss_sum
from posttrain.models.forward import evaluating
from posttrain.rollout import generate


def heldout_loss(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]],
                 chunk_size: int = 1024) -> dict[str, float]:
    """Mean cross-entropy per trained (completion) token over all held-out batches, and its perplexity."""
    total, count = 0.0, 0
    with evaluating(model):
        for batch in batches:
            total += float(completion_loss_sum(model, batch, chunk_size))
            count += num_targets(batch)
    loss = total / max(count, 1)
    return {"eval/loss": loss, "eval/ppl": math.exp(min(loss, 50.0)), "eval/tokens": count}


def sample_generations(model: torch.nn.Module, tokenizer, chats: list[Messages], *, max_new_tokens: int = 96,
                       chat_template: str | None = None,
                       tools: list[Tools | None] | None = None) -> list[dict[str, str]]:
    """Greedy completions of held-out chats (without their last assistant turn) next to the reference; a tool chat
    is offered its tools, as in training, and may end in a tool result the answer reads."""
    prompts = [c[:-1] for c in chats]
    outs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, chat_template=chat_template,
                    tools=tools)
    return [{"prompt": next(m["content"] for m in reversed(p) if m["role"] == "user"), "reference": c[-1]["content"],
             "output": o} for p, c, o in zip(prompts, chats, outs)]
