"""Evaluation suites: one data file and one model in, named metrics (with their direction) out.

A suite kind is a named function in ``SUITES`` (``(model, tokenizer, path, SuiteArgs) -> SuiteResult``); a
generation scorer is a named function in ``posttrain.eval.scorers.SCORERS``. Gates (``posttrain.eval.gate``)
compare the metrics of a candidate with a baseline's, so every metric says whether higher is better. Every suite
runs the model in eval mode without gradients and restores its training flag.

Layer 6 (eval): imports eval.
"""

from __future__ import annotations

from typing import Callable

from posttrain.eval.best_of_n import best_of_n_suite
from posttrain.eval.common import SuiteArgs, SuiteResult
from posttrain.eval.generation import abstention_suite, generation_suite, judge_suite
from posttrain.eval.likelihood import loss_suite, multiple_choice_suite, preference_suite
from posttrain.eval.lm_eval import lm_eval_suite

SUITES: dict[str, Callable[..., SuiteResult]] = {
    "loss": loss_suite, "generation": generation_suite, "preference": preference_suite,
    "multiple_choice": multiple_choice_suite, "abstention": abstention_suite, "judge": judge_suite,
    "lm_eval": lm_eval_suite, "best_of_n": best_of_n_suite,
}

# The options each kind reads; anything else is a typo and an error, not a silently ignored setting.
SUITE_OPTIONS: dict[str, set[str]] = {
    "loss": {"format", "max_seq_len", "overlong"},
    "generation": {"scorer", "pattern", "max_new_tokens", "prompt_field", "reference_field"},
    "preference": {"max_seq_len", "overlong", "bad_pairs"},
    "multiple_choice": set(),
    "abstention": {"pattern", "max_new_tokens", "prompt_field"},
    "judge": {"criterion", "max_new_tokens", "prompt_field", "margin"},
    "lm_eval": {"tasks"},
    "best_of_n": {"n", "temperature", "max_new_tokens", "prompt_field", "reference_field", "seed", "orm", "prm"},
}


def run_suite(kind: str, model, tokenizer, path: str, *, options: dict | None = None, limit: int | None = None,
              system_prompt: str | None = None, chat_template: str | None = None,
              reference_outputs: list[str] | None = None, judge=None, batch_size: int = 8) -> SuiteResult:
    """Run the suite ``kind`` (a key of ``SUITES``) of ``model`` on the data file ``path``; ``limit`` keeps the
    first rows. ``judge`` (a ``posttrain.judge.Judge``) and ``reference_outputs`` serve the judge suite."""
    if kind not in SUITES:
        raise ValueError(f"unknown eval suite {kind!r}; expected one of {', '.join(SUITES)}")
    options = dict(options or {})
    unknown = sorted(set(options) - SUITE_OPTIONS.get(kind, set()))
    if unknown:
        allowed = ", ".join(sorted(SUITE_OPTIONS.get(kind, set()))) or "none"
        raise ValueError(f"eval suite {kind!r}: unknown option(s) {', '.join(unknown)} (it reads: {allowed})")
    args = SuiteArgs(options, limit, system_prompt, chat_template, reference_outputs, judge, batch_size)
    return SUITES[kind](model, tokenizer, path, args)
