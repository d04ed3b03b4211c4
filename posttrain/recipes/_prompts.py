"""Prompts as the two online-RL recipes (grpo, ppo) read them: train and held-out prompt ids, rows and chats.
Layer 7, like the recipes."""

from __future__ import annotations

from typing import Any

from posttrain.config import PromptDataConfig
from posttrain.data import holdout_split
from posttrain.data.prompts import load_prompts
from posttrain.recipes._common import resolve_template

Prompts = tuple[list[list[int]], list[dict[str, Any]], list[Any]]  # (token ids, rows, chats), one entry per prompt


def read_prompts(path: str, d: PromptDataConfig, tokenizer: Any, limit: int | None) -> tuple[
        list[list[int]], list[dict[str, Any]], list[Any], list[str]]:
    return load_prompts(path, tokenizer, prompt_field=d.prompt_field, system_prompt=d.system_prompt,
                        max_prompt_len=d.max_prompt_len, overlong=d.overlong,
                        chat_template=resolve_template(d.chat_template), limit=limit)


def load_prompt_splits(d: PromptDataConfig, tokenizer: Any) -> tuple[Prompts, Prompts, list[str]]:
    """(train prompts, rows, chats), the same for held-out prompts (data.eval or a split of train), report lines."""
    prompts, rows, chats, lines = read_prompts(d.train, d, tokenizer, d.limit)
    if d.eval:
        held = read_prompts(d.eval, d, tokenizer, d.eval_limit)
        lines += held[3]
        return (prompts, rows, chats), held[:3], lines
    keep, hold = holdout_split(len(prompts), d.eval_fraction, d.split_seed)
    hold = hold[:d.eval_limit] if d.eval_limit else hold
    held = tuple([x[i] for i in hold] for x in (prompts, rows, chats))
    train = tuple([x[i] for i in keep] for x in (prompts, rows, chats))
    if hold:
        lines.append(f"held out {len(hold)} prompts (eval_fraction={d.eval_fraction}, split_seed={d.split_seed})")
    return train, held, lines
