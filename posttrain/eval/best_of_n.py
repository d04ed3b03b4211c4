"""Best-of-N: sample N solutions per question, let a selector pick one, score the pick against the reference.

This is how an outcome reward model (Cobbe et al., 2021, "Training Verifiers to Solve Math Word Problems": rank the
samples by the verifier) and a process reward model (Wang et al., 2024, "Math-Shepherd": a solution's score is its
lowest step probability, used alone or to weight a vote) are judged: by the accuracy they buy over majority vote
(Wang et al., 2023, "Self-Consistency Improves Chain of Thought Reasoning"), below the ceiling of ``oracle``
(pass@N: some sample is right).

One sampling pass draws N_max = max(options.n) solutions per question; best-of-N for a smaller N reads the first N
of them, so every selector and every N is compared on the same samples. Sample j of a question draws from its own
generator, seeded by (seed, row, j) alone (``rollout.sample.row_generators``), so it does not depend on N_max or on
the batch. An answer is a solution's final number (its ``####`` line, else its last number); a sample cut by
max_new_tokens is judged like any other, and the share of them is the ``truncated`` metric.

Metrics: ``<selector>@<N>`` accuracy (higher is better) and ``<selector>@<N>_se``, its binomial standard error
sqrt(p (1 - p) / questions), so a difference on a small set is read against it.

Layer 6 (eval): imports data, engine, errors, io, rewards, rollout and eval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from posttrain.data.render import has_chat_template, render_prompt
from posttrain.engine import console
from posttrain.errors import DataError
from posttrain.eval.common import SuiteArgs, SuiteResult
from posttrain.eval.generation import read_prompts
from posttrain.eval.scorers import REFERENCE_FIELDS, score_number
from posttrain.io import content_key
from posttrain.rewards import load_prm, load_reward
from posttrain.rewards.functions import final_number
from posttrain.rewards.process import prm_scores
from posttrain.rollout.sample import sample_completions


@dataclass
class Pool:
    """One question's solutions as the selectors see them, in sampling order."""
    answers: list[float | None]     # each solution's final number; None: it has none
    correct: list[bool]             # its final number equals the reference's
    orm: list[float] | None = None  # the ORM's score of each solution, when an ORM is configured
    prm: list[float] | None = None  # the PRM's lowest step probability of each solution, when a PRM is

    def first(self, n: int) -> Pool:
        """Best-of-n's pool: the first n solutions, so a smaller n's pool is part of every larger one's."""
        return Pool(self.answers[:n], self.correct[:n], _head(self.orm, n), _head(self.prm, n))


def _head(values: list[float] | None, n: int) -> list[float] | None:
    return None if values is None else values[:n]


def argmax(values: Sequence[float]) -> int:
    """The index of the largest value; among equal ones, the first (the earliest sample)."""
    return max(range(len(values)), key=values.__getitem__)


def vote(answers: Sequence[float | None], weights: Sequence[float]) -> int:
    """The first solution holding the answer of the largest total weight. Solutions without a final number do not
    vote; equal totals go to the answer sampled first; when no solution has an answer, the first solution."""
    totals: dict[float, float] = {}
    for answer, weight in zip(answers, weights):
        if answer is not None:
            totals[answer] = totals.get(answer, 0.0) + weight
    if not totals:
        return 0
    best = max(totals, key=totals.__getitem__)  # totals is in order of first appearance; max keeps the first
    return list(answers).index(best)


def select_first(pool: Pool) -> int:
    """The first sample: plain sampling, what best-of-1 is for every selector."""
    return 0


def select_majority(pool: Pool) -> int:
    """Self-consistency: the most frequent final answer, ties broken by the first sample."""
    return vote(pool.answers, [1.0] * len(pool.answers))


def select_orm(pool: Pool) -> int:
    """The solution the ORM scores highest (ties: the earlier sample)."""
    return argmax(pool.orm)


def select_prm_min(pool: Pool) -> int:
    """The solution whose weakest step the PRM rates highest (ties: the earlier sample)."""
    return argmax(pool.prm)


def select_prm_vote(pool: Pool) -> int:
    """PRM-weighted vote: an answer's weight is the sum of its solutions' min step probabilities."""
    return vote(pool.answers, pool.prm)


def select_oracle(pool: Pool) -> int:
    """A correct solution when there is one: the ceiling (pass@N on these samples), not a method."""
    return next((i for i, ok in enumerate(pool.correct) if ok), 0)


SELECTORS: dict[str, Callable[[Pool], int]] = {
    "first": select_first, "majority": select_majority, "orm": select_orm, "prm_min": select_prm_min,
    "prm_vote": select_prm_vote, "oracle": select_oracle,
}
NEEDS = {"orm": "orm", "prm_min": "prm", "prm_vote": "prm"}  # selector -> the option naming the model it reads


@dataclass(frozen=True)
class Settings:
    ns: list[int]  # increasing
    temperature: float = 0.8
    max_new_tokens: int = 256
    seed: int = 0


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_options(options: dict[str, Any]) -> Settings:
    """The sampling settings of ``options``; a bad value is a ValueError naming the option."""
    where = "eval suite 'best_of_n': options"
    ns = options.get("n", [1, 4, 16])
    if not isinstance(ns, list) or not ns or not all(_is_int(n) and n > 0 for n in ns):
        raise ValueError(f"{where}.n: expected a non-empty list of positive integers, got {ns!r}")
    if len(set(ns)) != len(ns):
        raise ValueError(f"{where}.n: {ns} lists a value twice")
    temperature = options.get("temperature", 0.8)
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
        raise ValueError(f"{where}.temperature: expected a number > 0 (greedy samples would all be the same), got "
                         f"{temperature!r}")
    max_new = options.get("max_new_tokens", 256)
    if not _is_int(max_new) or max_new <= 0:
        raise ValueError(f"{where}.max_new_tokens: expected a positive integer, got {max_new!r}")
    seed = options.get("seed", 0)
    if not _is_int(seed):
        raise ValueError(f"{where}.seed: expected an integer, got {seed!r}")
    orm = options.get("orm")
    if orm is not None and not (isinstance(orm, str) or isinstance(orm, list) and orm
                                and all(isinstance(p, str) for p in orm)):
        raise ValueError(f"{where}.orm: expected a reward run folder (or a list of them, an ensemble), got {orm!r}")
    if options.get("prm") is not None and not isinstance(options["prm"], str):
        raise ValueError(f"{where}.prm: expected a prm run folder, got {options['prm']!r}")
    for key in ("prompt_field", "reference_field"):
        if options.get(key) is not None and not isinstance(options[key], str):
            raise ValueError(f"{where}.{key}: expected a column name, got {options[key]!r}")
    return Settings(sorted(ns), float(temperature), max_new, seed)


def score_pools(prompts: Sequence[Any], samples: Sequence[list[str]], references: Sequence[str], *, orm=None,
                prm=None, batch_size: int = 8) -> list[Pool]:
    """Each question's answers and correctness, with ``orm.score`` and the PRM's lowest step probability
    (``rewards.process.prm_scores``: steps are non-empty lines) of every sample when given. A sample without a
    step (an empty text) gets PRM score 0, below any scored one."""
    pools = [Pool([final_number(t, strict=False) for t in texts], [bool(score_number(t, ref, {})) for t in texts])
             for texts, ref in zip(samples, references)]
    flat_prompts = [p for p, texts in zip(prompts, samples) for _ in texts]
    flat_texts = [t for texts in samples for t in texts]
    if orm is not None:
        for pool, scores in zip(pools, _regroup(orm.score(flat_prompts, flat_texts, batch_size), samples)):
            pool.orm = [float(s) for s in scores]
    if prm is not None:
        lowest = prm_scores(prm, flat_prompts, flat_texts, reduce="min", split="line", batch_size=batch_size)
        for pool, scores in zip(pools, _regroup(lowest, samples)):
            pool.prm = scores
    return pools


def _regroup(flat: Sequence[float], samples: Sequence[list[str]]) -> list[list[float]]:
    out, at = [], 0
    for texts in samples:
        out.append(list(flat[at:at + len(texts)]))
        at += len(texts)
    return out


def best_of_n_metrics(pools: Sequence[Pool], ns: Sequence[int],
                      selectors: Sequence[str]) -> tuple[dict[str, float], dict[str, bool]]:
    """``<selector>@<N>`` accuracy and ``<selector>@<N>_se`` (binomial standard error) for every selector and N."""
    metrics: dict[str, float] = {}
    hib: dict[str, bool] = {}
    for name in selectors:
        for n in ns:
            acc = sum(p.correct[SELECTORS[name](p.first(n))] for p in pools) / len(pools)
            metrics[f"{name}@{n}"], hib[f"{name}@{n}"] = acc, True
            # recorded for the report; the direction only satisfies the table (a gate reads the accuracy)
            metrics[f"{name}@{n}_se"], hib[f"{name}@{n}_se"] = math.sqrt(acc * (1 - acc) / len(pools)), False
    return metrics, hib


def prompt_tokens(tokenizer, chat, chat_template: str | None = None) -> list[int]:
    """A chat's prompt tokens up to the assistant header (a chat template carries its own special tokens)."""
    text = render_prompt(tokenizer, chat, chat_template)
    return tokenizer(text, add_special_tokens=not has_chat_template(tokenizer, chat_template))["input_ids"]


def _reference_field(row: dict[str, Any], options: dict[str, Any]) -> str:
    return options.get("reference_field") or next((f for f in REFERENCE_FIELDS if f in row), "messages")


def best_of_n_suite(model, tokenizer, path: str, a: SuiteArgs) -> SuiteResult:
    """Accuracy of every selector at every N of ``options.n`` on GSM8K-style rows (see the module docstring);
    the selectors of an ORM or PRM run only when ``options.orm`` / ``options.prm`` names its run folder."""
    s = check_options(a.options)
    rows = read_prompts(path, limit=a.limit, system_prompt=a.system_prompt, prompt_field=a.options.get("prompt_field"),
                        reference_field=a.options.get("reference_field"), need_reference=True)
    if not rows:
        raise DataError(path, None, None, "no rows: best-of-N needs questions to sample")
    for num, _, ref, row in rows:
        if final_number(ref, strict=False) is None:
            raise DataError(path, num, _reference_field(row, a.options), f"no number in the reference answer "
                            f"{ref[-60:]!r} (best-of-N compares final numbers, e.g. GSM8K's '#### 72')")
    # loaded before sampling, so a wrong folder fails in seconds, not after the samples
    models = {"orm": load_reward(a.options["orm"]) if a.options.get("orm") else None,
              "prm": load_prm(a.options["prm"]) if a.options.get("prm") else None}
    n_max = s.ns[-1]
    seeds = [int(content_key("best-of-n", s.seed, num), 16) % 2 ** 63 for num, _, _, _ in rows]
    ids = [prompt_tokens(tokenizer, chat, a.chat_template) for _, chat, _, _ in rows]
    ro = sample_completions(model, tokenizer, ids, n=n_max, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                            batch_size=a.batch_size * n_max, seeds=seeds)
    samples = [ro.texts[k:k + n_max] for k in range(0, len(ro.texts), n_max)]
    pools = score_pools([chat for _, chat, _, _ in rows], samples, [ref for _, _, ref, _ in rows], orm=models["orm"],
                        prm=models["prm"], batch_size=a.batch_size)
    run = [name for name in SELECTORS if name not in NEEDS or models[NEEDS[name]] is not None]
    skipped = [name for name in SELECTORS if name not in run]
    if skipped:
        console.print(f"best_of_n on {path}: skipped {', '.join(skipped)}, whose model is not configured (set "
                      f"{' / '.join(f'options.{o}' for o in sorted({NEEDS[k] for k in skipped}))})")
    metrics, hib = best_of_n_metrics(pools, s.ns, run)
    metrics["truncated"], hib["truncated"] = 1 - sum(ro.finished) / len(ro.finished), False
    details = [{"row": num, "prompt": chat[-1]["content"], "reference": ref, "samples": texts,
                "answers": pool.answers, "correct": pool.correct,
                "picked_at_n_max": {name: SELECTORS[name](pool) for name in run}, "skipped": skipped}
               for (num, chat, ref, _), texts, pool in zip(rows, samples, pools)]
    return SuiteResult(metrics, hib, None, details)
