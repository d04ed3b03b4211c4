"""Load a trained process reward model (``posttrain prm``) and score every step of solutions, in batches.

A solution is rendered as it was in training (``data.steps.render_steps``: the run's system prompt, chat template
and step separator), and each step gets p = sigmoid(score at the token holding its last character), the model's
probability that the step is correct.

In online RL a completion is cut into steps as ``posttrain data prm-labels`` cut the PRM's training solutions
(``data.steps.split_steps``): GRPO's ``prm`` reward term reduces its step probabilities to one score
(``REDUCES``), PPO's ``ppo.step_rewards`` puts each on the completion token that ends the step
(``completion_steps``).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch

from posttrain.data.formats import Messages
from posttrain.data.steps import StepExample, collate_steps, render_steps, row_to_steps, step_spans
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


class StepScorer(Protocol):
    def score_steps(self, prompts: Sequence[str | Messages], step_lists: Sequence[list[str]],
                    batch_size: int = 8) -> list[list[float]]: ...


def score_solutions(scorer: StepScorer, prompts: Sequence[Any], solutions: Sequence[list[str]],
                    batch_size: int = 8) -> list[list[float]]:
    """Per solution its step probabilities, [] for a solution without steps (nothing to score)."""
    keep = [k for k, steps in enumerate(solutions) if steps]
    scored = scorer.score_steps([prompts[k] for k in keep], [solutions[k] for k in keep], batch_size) if keep else []
    out: list[list[float]] = [[] for _ in solutions]
    for k, probs in zip(keep, scored):
        out[k] = probs
    return out


# How a solution's step probabilities become one score. prod: the probability that every step is correct
# (Lightman et al. 2023, "Let's Verify Step by Step"); min: the weakest step (Wang et al. 2024,
# Math-Shepherd); last: the final step's, which has seen the whole solution; mean: the average step.
REDUCES: dict[str, Callable[[list[float]], float]] = {
    "min": min,
    "last": lambda probs: probs[-1],
    "mean": lambda probs: sum(probs) / len(probs),
    "prod": math.prod,
}


def reduce_of(name: str) -> Callable[[list[float]], float]:
    if name not in REDUCES:
        raise ValueError(f"the prm reward's reduce {name!r}: expected one of {', '.join(REDUCES)}")
    return REDUCES[name]


def prm_scores(scorer: StepScorer, prompts: Sequence[Any], completions: Sequence[str], reduce: str = "min",
               split: str = "line", batch_size: int = 8) -> list[float]:
    """Each completion's steps (``split_steps(completion, split)``) scored and reduced by ``REDUCES[reduce]``; a
    completion with no steps (empty or blank) scores 0.0, as an answer the PRM can say nothing good about."""
    fn = reduce_of(reduce)
    solutions = [[c[a:b] for a, b in step_spans(c, split)] for c in completions]
    return [fn(p) if p else 0.0 for p in score_solutions(scorer, prompts, solutions, batch_size)]


@functools.lru_cache(maxsize=4)
def _cached_prm(path: str, device: str, dtype: str) -> ProcessRewardModel:
    return ProcessRewardModel(path, device=device, dtype=dtype)


def prm_reward(prompts: Sequence[Any], completions: Sequence[str], path: str | None = None, reduce: str = "min",
               split: str = "line", batch_size: int = 8, device: str = "auto", dtype: str = "auto",
               **row: Any) -> list[float]:
    """The ``prm`` reward term: a process reward model trained by ``posttrain prm`` (its run folder) scores every
    step of a completion, reduced to one score by ``reduce`` (min, last, mean or prod; see ``REDUCES``). A
    completion with no steps scores 0.0. A learned proxy, so worth watching next to a verifier (``watch``). Loaded
    once per process."""
    if not path:
        raise ValueError("the prm reward needs options: {path: <a `posttrain prm` run folder>}")
    reduce_of(reduce)  # a bad name is refused before the model is loaded
    return prm_scores(_cached_prm(str(path), device, dtype), prompts, completions, reduce, split, batch_size)


def completion_steps(tokenizer: Any, completion_ids: Sequence[int], split: str = "line") -> tuple[list[str], list[int]]:
    """A sampled completion's steps (cut from its text, decoded as the rollout decodes it) and, per step, the index
    of the completion token that writes the step's last character: the first k whose prefix ``ids[:k + 1]``
    decodes to the text through that character. Found by bisection over prefix decodes, so it is exact for the
    sampled tokens themselves (re-tokenising the text could split it otherwise), for tokens that hold several
    characters and for characters spread over several tokens (a prefix ending inside one decodes to U+FFFD)."""
    ids = list(completion_ids)
    decode = lambda k: tokenizer.decode(ids[:k], skip_special_tokens=True)  # noqa: E731
    text = decode(len(ids))
    spans = step_spans(text, split)
    ends, lo = [], 0
    for _, end in spans:
        want, hi = text[:end], len(ids) - 1  # the whole completion decodes to text, so hi qualifies
        while lo < hi:
            mid = (lo + hi) // 2
            if decode(mid + 1).startswith(want):
                hi = mid
            else:
                lo = mid + 1
        ends.append(lo)
    return [text[a:b] for a, b in spans], ends
