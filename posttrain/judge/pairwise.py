"""Pairwise AI judging with both orders, so a judge's taste for one slot cancels out.

A judge is any callable ``(prompt, first, second, criterion) -> P(first is better)``. Language-model judges
prefer whichever answer is shown first (or second) by a margin that has nothing to do with the answers; asking
twice with the slots swapped and keeping only verdicts that agree removes that bias: a pure position preference
flips with the slots and shows up as an inconsistent pair, which is dropped and counted, never guessed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from posttrain.data.render import has_chat_template, render_prompt
from posttrain.models.forward import evaluating

Verdict = Literal["a", "b", "tie", "inconsistent"]

JUDGE_TEMPLATE = (
    "You compare two answers to the same request.\n"
    "Criterion: {criterion}\n\n"
    "Request:\n{prompt}\n\n"
    "Answer A:\n{first}\n\n"
    "Answer B:\n{second}\n\n"
    "Which answer better meets the criterion? Reply with one letter, A or B."
)


class Judge(Protocol):
    def __call__(self, prompt: str, first: str, second: str, criterion: str) -> float: ...


@dataclass(frozen=True)
class PairVerdict:
    """The combined verdict on answers a and b, and the two one-order probabilities it came from."""
    verdict: Verdict
    p_a_first: float   # P(a better) with a in slot A
    p_a_second: float  # P(a better) with a in slot B (1 - the judge's P(slot A better))

    @property
    def p_a(self) -> float:
        """The position-debiased probability that a is better: the mean of both orders."""
        return (self.p_a_first + self.p_a_second) / 2


def both_orders(judge: Judge, prompt: str, a: str, b: str, criterion: str, *, margin: float = 0.0) -> PairVerdict:
    """Judge (a, b) and (b, a). A winner must win in both orders by more than ``margin`` (in probability above
    one half); a pair where each order favours its first (or second) slot is inconsistent; the rest are ties."""
    p1 = float(judge(prompt, a, b, criterion))
    p2 = 1.0 - float(judge(prompt, b, a, criterion))
    if p1 > 0.5 + margin and p2 > 0.5 + margin:
        verdict: Verdict = "a"
    elif p1 < 0.5 - margin and p2 < 0.5 - margin:
        verdict = "b"
    elif (p1 - 0.5) * (p2 - 0.5) < 0 and abs(p1 - 0.5) > margin and abs(p2 - 0.5) > margin:
        verdict = "inconsistent"
    else:
        verdict = "tie"
    return PairVerdict(verdict, p1, p2)


def win_rate(verdicts: list[PairVerdict]) -> dict[str, float]:
    """Share of a's wins, b's wins, ties and inconsistent pairs; ``win_rate`` counts a tie as half a win and leaves
    inconsistent pairs out (they say nothing about the answers)."""
    n = len(verdicts)
    counts = {v: sum(p.verdict == v for p in verdicts) for v in ("a", "b", "tie", "inconsistent")}
    decided = counts["a"] + counts["b"] + counts["tie"]
    return {"win_rate": (counts["a"] + 0.5 * counts["tie"]) / decided if decided else float("nan"),
            "wins": counts["a"] / max(n, 1), "losses": counts["b"] / max(n, 1), "ties": counts["tie"] / max(n, 1),
            "inconsistent": counts["inconsistent"] / max(n, 1), "pairs": float(n)}


class ModelJudge:
    """A causal LM as a judge: P(first better) = softmax over the next-token logits of "A" and "B" after the
    judging prompt (read from the logits, not parsed from sampled text, so there is no unparseable verdict)."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, template: str = JUDGE_TEMPLATE,
                 chat_template: str | None = None, name: str = "model") -> None:
        self.model, self.tokenizer, self.template, self.chat_template, self.name = \
            model, tokenizer, template, chat_template, name
        self.choice_ids = [self._single_token(letter) for letter in ("A", "B")]

    def _single_token(self, letter: str) -> int:
        ids = self.tokenizer(letter, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"judge: {letter!r} is {len(ids)} tokens for this tokenizer; a judge needs one")
        return ids[0]

    @torch.no_grad()
    def __call__(self, prompt: str, first: str, second: str, criterion: str) -> float:
        text = self.template.format(prompt=prompt, first=first, second=second, criterion=criterion)
        rendered = render_prompt(self.tokenizer, [{"role": "user", "content": text}], self.chat_template)
        add_special = not has_chat_template(self.tokenizer, self.chat_template)
        ids = self.tokenizer(rendered, add_special_tokens=add_special, return_tensors="pt")["input_ids"]
        with evaluating(self.model):
            # only the last position: the LM head over a long judging prompt would be a tenth of the forward
            logits = self.model(input_ids=ids.to(next(self.model.parameters()).device),
                                logits_to_keep=1).logits[0, -1].float()
        pair = torch.log_softmax(logits[self.choice_ids], dim=-1)
        return float(pair[0].exp())



def _logit(p: float, eps: float = 1e-6) -> float:
    p = min(max(p, eps), 1 - eps)
    return math.log(p / (1 - p))


class CalibratedJudge:
    """A judge corrected by its own verdict on content-free pairs ("contextual calibration", Zhao et al., 2021,
    "Calibrate Before Use"): with the same answer in both slots every preference is position, so

        P'(first better) = sigmoid(logit P(first, second) - (logit P(first, first) + logit P(second, second)) / 2).

    A small judge whose slot preference outweighs what it reads in the answers makes every pair inconsistent under
    ``both_orders``; removing the measured slot preference first lets its (weak) content signal decide, and
    ``both_orders`` still drops pairs where the two orders disagree after correction."""

    def __init__(self, judge: Judge) -> None:
        self.judge = judge
        self.name = f"calibrated {getattr(judge, 'name', 'judge')}"
        self._null: dict[tuple[str, str, str], float] = {}

    def null_logit(self, prompt: str, answer: str, criterion: str) -> float:
        key = (prompt, answer, criterion)
        if key not in self._null:  # both orders of a pair need the same two content-free verdicts
            self._null[key] = _logit(self.judge(prompt, answer, answer, criterion))
        return self._null[key]

    def __call__(self, prompt: str, first: str, second: str, criterion: str) -> float:
        bias = (self.null_logit(prompt, first, criterion) + self.null_logit(prompt, second, criterion)) / 2
        return 1 / (1 + math.exp(-(_logit(self.judge(prompt, first, second, criterion)) - bias)))
