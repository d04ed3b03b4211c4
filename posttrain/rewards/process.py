"""Load a trained process reward model (``posttrain prm``) and score every step of solutions, in batches.

A solution is rendered as it was in training (``data.steps.render_steps``: the run's system prompt, chat template
and step separator), and each step gets p = sigmoid(score at the token holding its last character), the model's
probability that the step is correct.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from posttrain.data.formats import Messages
from posttrain.data.steps import StepExample, collate_steps, render_steps, row_to_steps
from posttrain.models.heads import StepScoreModel
from posttrain.rewards.model import load_scorer, run_template

SOURCE = "score_steps"  # the "file" an input error names; its rows are the items, numbered from 1


class ProcessRewardModel:
    """A prm run folder loaded for scoring steps."""

    def __init__(self, run_dir: str | Path, *, device: str = "auto", dtype: str = "auto"):
        self.model, self.tokenizer, cfg = load_scorer(run_dir, "prm", StepScoreModel, device=device, dtype=dtype)
        self.chat_template = run_template(cfg)
        self.system_prompt = cfg["data"].get("system_prompt")
        self.separator = cfg["prm"]["step_separator"]

    def example(self, prompt: str | Messages, steps: list[str], num: int) -> StepExample:
        """Item ``num`` (from 1) rendered; a bad prompt or step is a DataError naming it and the field."""
        row = {"prompt": prompt, "steps": steps, "labels": [None] * len(steps) if isinstance(steps, list) else None}
        chat, steps, labels = row_to_steps(row, SOURCE, num, self.system_prompt)
        ids, ends = render_steps(self.tokenizer, chat, steps, self.separator, self.chat_template, file=SOURCE, num=num)
        return StepExample(ids, ends, labels, num, SOURCE)

    @torch.no_grad()
    def score_steps(self, prompts: Sequence[str | Messages], step_lists: Sequence[list[str]],
                    batch_size: int = 8) -> list[list[float]]:
        """Per solution, one probability per step that the step is correct; prompts are text (one user turn) or
        chat messages ending with a user turn."""
        if len(prompts) != len(step_lists):
            raise ValueError(f"{len(prompts)} prompts but {len(step_lists)} step lists")
        examples = [self.example(p, s, k + 1) for k, (p, s) in enumerate(zip(prompts, step_lists))]
        out: list[list[float]] = []
        for k in range(0, len(examples), batch_size):
            chunk = examples[k:k + batch_size]
            probs = torch.sigmoid(self.model(collate_steps([[e] for e in chunk], self.tokenizer.pad_token_id)))
            for part in probs.split([len(e.step_ends) for e in chunk]):
                out.append(part.tolist())
        return out


def load_prm(path: str | Path, **kw) -> ProcessRewardModel:
    """``load_prm("runs/prm").score_steps(["What is 2+3?"], [["2+3 = 5.", "The answer is 5."]])``."""
    return ProcessRewardModel(path, **kw)
