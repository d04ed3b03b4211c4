"""Step labels for a process reward model without human annotation: Math-Shepherd's automatic process supervision
(Wang et al., 2024, "Math-Shepherd: Verify and Reinforce LLMs Step-by-step without Human Annotations").

The quality of a step is its potential to reach the right answer. For each question the model writes one
solution, which is cut into steps; from every step prefix (steps 1..i) K completions are sampled and checked
against the reference. The step's hard estimate (HE) is 1 when any of the K reaches the reference answer, its soft
estimate (SE) the share that do. Both come from the same success counts, which every row keeps.

A rollout continues the assistant turn: its prompt is the question's prompt tokens (rendered as GRPO renders its
prompts, generation prompt included) followed by the tokens of the prefix text with its trailing separator, so no
end-of-turn marker or second assistant header is ever put between the prefix and the rollout. A rollout is right
when the gsm8k_answer verifier accepts prefix + rollout (the '####' number, else the last number), so a rollout
that adds nothing is judged by the prefix itself.

Sampling is seeded per (row number, prefix): a row's labels depend on the settings and that row alone, so a resumed
file equals an uninterrupted one. The output is written a row at a time (one write, flushed and synced): an
interrupted run loses at most the row in progress, whose torn line ``--resume`` drops.

Layer 6 (curate): may import data, models, rollout, rewards, errors and io; never config.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from posttrain.data.formats import Messages
from posttrain.data.readers import read_rows
from posttrain.data.render import has_chat_template, render_prompt
from posttrain.data.steps import STEP_SPLITS, split_steps
from posttrain.errors import ConfigError, DataError
from posttrain.io import atomic_write_text, content_key
from posttrain.rewards.functions import final_number, gsm8k_answer
from posttrain.rollout.interface import RolloutEngine


def hard_label(successes: int, k: int) -> int:
    """HE: 1 when any of the ``k`` rollouts from the step reaches the reference answer, else 0."""
    return int(successes > 0)


def soft_label(successes: int, k: int) -> float:
    """SE: the share of the ``k`` rollouts from the step that reach the reference answer."""
    return successes / k


LABELS: dict[str, Callable[[int, int], float]] = {"hard": hard_label, "soft": soft_label}

# The provenance every row carries; a resumed file must have been written with the same values.
PROVENANCE = ("model", "k", "temperature", "max_new_tokens", "seed", "label", "step_split", "solution")


def prefix_texts(steps: list[str], split: str = "line") -> list[str]:
    """Steps 1..i joined, with the trailing separator, for every i: the text a rollout from step i continues."""
    joiner = STEP_SPLITS[split][1]
    return [joiner.join(steps[:i]) + joiner for i in range(1, len(steps) + 1)]


def prompt_ids(tokenizer: Any, chat: Messages) -> list[int]:
    """A chat's prompt tokens, ending with the assistant header, rendered as data.prompts.load_prompts renders
    GRPO's (a chat template carries its own special tokens; a plain prompt gets the tokenizer's)."""
    text = render_prompt(tokenizer, chat, None)
    return tokenizer(text, add_special_tokens=not has_chat_template(tokenizer))["input_ids"]


def continuation_ids(prompt: list[int], prefix: str, tokenizer: Any) -> list[int]:
    """The prompt, then the prefix's own tokens and nothing else: the assistant turn goes on where the prefix stops
    (rendering prompt + prefix as a chat would close the turn and open a new one)."""
    return [*prompt, *tokenizer(prefix, add_special_tokens=False)["input_ids"]]


def row_seed(seed: int, row: int, part: int) -> int:
    """The sampling seed of one part of an input row: 0 its solution, i the rollouts from step i."""
    return int(content_key("prm-labels", seed, row, part), 16) % 2 ** 63


@dataclass(frozen=True)
class PRMSettings:
    model: str
    k: int = 4
    temperature: float = 0.8
    max_new_tokens: int = 128  # the budget of the solution and of every rollout
    seed: int = 0
    label: str = "hard"
    step_split: str = "line"
    batch_size: int = 64  # completions per forward; a row's rollouts go to the sampler in one call
    solution: str = "sampled"  # a key of SOLUTIONS: whose solution's steps are labelled

    def __post_init__(self) -> None:
        if self.solution not in SOLUTIONS:
            raise ConfigError(f"solution {self.solution!r}: expected one of {', '.join(SOLUTIONS)}")
        if self.label not in LABELS:
            raise ConfigError(f"label {self.label!r}: expected one of {', '.join(LABELS)}")
        if self.step_split not in STEP_SPLITS:
            raise ConfigError(f"step split {self.step_split!r}: expected one of {', '.join(STEP_SPLITS)}")
        for name in ("k", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be above 0 (greedy rollouts from a prefix would all be the same "
                              f"one), got {self.temperature}")

    def provenance(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in PROVENANCE}


@dataclass
class Question:
    row: int  # its row number in the input file
    chat: Messages  # what the model answers: the question, after the system prompt when there is one
    prompt: str | Messages  # the output's prompt: the question text, or the chat when a system prompt is used
    answer: Any  # the reference, as the row gives it


def read_questions(path: str | Path, *, question_field: str = "question", answer_field: str = "answer",
                   system_prompt: str | None = None, limit: int | None = None) -> list[Question]:
    """The first ``limit`` rows (all without it) of a file as questions with a reference answer holding a number."""
    rows = read_rows(path)
    out = []
    for num, row in rows[:limit] if limit else rows:
        text = row.get(question_field)
        if not isinstance(text, str) or not text.strip():
            raise DataError(path, num, question_field, "missing or empty question (--question-field names the "
                            f"column; this row has {', '.join(map(repr, row)) or 'no columns'})")
        ref = row.get(answer_field)
        if ref is None or final_number(str(ref), strict=False) is None:
            raise DataError(path, num, answer_field, "missing reference answer (--answer-field names the column)"
                            if ref is None else f"no number in the reference answer {str(ref)[-60:]!r}")
        chat = [{"role": "user", "content": text}]
        if system_prompt:
            chat = [{"role": "system", "content": system_prompt}, *chat]
        out.append(Question(num, chat, chat if system_prompt else text, ref))
    return out


@dataclass
class RowLabels:
    solution: str
    steps: list[str]
    successes: list[int]  # per step: rollouts (of k) that reach the reference answer
    tokens: int  # tokens sampled for the row: its solution and every rollout
    cut: int  # of the solution and the rollouts, those stopped by max_new_tokens


def correct(texts: list[str], answer: Any) -> list[bool]:
    return [bool(v) for v in gsm8k_answer([None] * len(texts), texts, answer=[answer] * len(texts), strict=False)]


def sampled_solution(q: Question, engine: RolloutEngine, ids: list[int], s: PRMSettings,
                     sampling: dict[str, Any]) -> tuple[str, int, int]:
    """Math-Shepherd's: one solution sampled from the model (its text, tokens sampled, 1 if cut)."""
    sol = engine.sample([ids], n=1, seeds=[row_seed(s.seed, q.row, 0)], batch_size=1, **sampling)
    return sol.texts[0], len(sol.completion_ids[0]), int(not sol.finished[0])


_CALCULATOR = re.compile(r"<<[^<>]*>>")


def reference_solution(q: Question, engine: RolloutEngine, ids: list[int], s: PRMSettings,
                       sampling: dict[str, Any]) -> tuple[str, int, int]:
    """The row's reference solution (GSM8K's worked answer, its calculator annotations <<48/2=24>> removed, its
    '#### N' line kept as the last step); nothing is sampled. Its steps are right by construction, so the labels
    measure how often the model finishes from each of them: the positives a weak model's own solutions lack."""
    return _CALCULATOR.sub("", str(q.answer)), 0, 0


# Whose solution is cut into steps and labelled.
SOLUTIONS: dict[str, Callable[..., tuple[str, int, int]]] = {"sampled": sampled_solution,
                                                               "reference": reference_solution}


def label_question(q: Question, engine: RolloutEngine, tokenizer: Any, s: PRMSettings) -> RowLabels:
    """Sample a solution, cut it into steps, and count the successes of ``s.k`` rollouts from every step prefix
    (all of them in one ``engine.sample`` call)."""
    ids = prompt_ids(tokenizer, q.chat)
    sampling = {"max_new_tokens": s.max_new_tokens, "temperature": s.temperature, "top_p": 1.0, "min_new_tokens": 0}
    solution, tokens, cut = SOLUTIONS[s.solution](q, engine, ids, s, sampling)
    steps = split_steps(solution, s.step_split)
    if not steps:
        return RowLabels(solution, [], [], tokens, cut)
    prefixes = prefix_texts(steps, s.step_split)
    ro = engine.sample([continuation_ids(ids, p, tokenizer) for p in prefixes], n=s.k,
                       seeds=[row_seed(s.seed, q.row, i) for i in range(1, len(prefixes) + 1)],
                       batch_size=s.batch_size, **sampling)
    hits = correct([prefixes[j // s.k] + text for j, text in enumerate(ro.texts)], q.answer)
    successes = [sum(hits[i * s.k:(i + 1) * s.k]) for i in range(len(prefixes))]
    return RowLabels(solution, steps, successes, tokens + sum(map(len, ro.completion_ids)),
                     cut + ro.finished.count(False))


def row_record(q: Question, labels: RowLabels, s: PRMSettings, source: str) -> dict[str, Any]:
    """One output row (the shape the PRM trainer reads)."""
    return {"prompt": q.prompt, "steps": labels.steps,
            "labels": [LABELS[s.label](n, s.k) for n in labels.successes], "successes": labels.successes,
            "k": s.k, "answer": q.answer, "provenance": {**s.provenance(), "source": f"{source}:{q.row}"}}


def meta_path(out: str | Path) -> Path:
    return Path(f"{out}.meta.json")


@dataclass
class PRMJob:
    source: str  # the input file, as given
    out: Path
    settings: PRMSettings
    questions: list[Question]
    start: int  # index of the first question still to label
    resumed: int  # rows already in ``out``
    torn: bool  # ``out`` ended in a torn row (an interrupted write), which was dropped
    options: dict[str, Any] = field(default_factory=dict)  # the reading options, recorded in the meta file


def _existing_rows(out: Path) -> tuple[list[tuple[int, dict[str, Any]]], bool]:
    lines = out.read_text(encoding="utf-8").split("\n")  # the last piece is '' unless a write was torn
    rows = []
    for num, line in enumerate(lines[:-1], 1):
        try:
            rows.append((num, json.loads(line)))
        except ValueError as exc:
            raise DataError(out, num, None, f"not a JSON row ({exc}); not a file this command wrote?") from None
    return rows, bool(lines[-1])


def check_resume(out: Path, questions: list[Question], s: PRMSettings, source: str) -> tuple[int, int, bool]:
    """(rows already in ``out``, index of the question to continue from, whether a torn last row was dropped).
    Every row must carry this run's settings and match the input row it names."""
    rows, torn = _existing_rows(out)
    index = {q.row: i for i, q in enumerate(questions)}
    want, last = s.provenance(), 0
    for num, rec in rows:
        prov = rec.get("provenance") if isinstance(rec, dict) else None
        prov = prov if isinstance(prov, dict) else {}
        for key, value in want.items():
            if prov.get(key) != value:
                raise DataError(out, num, f"provenance.{key}", f"written with {key}={prov.get(key)!r}, this run has "
                                f"{value!r}: resume with the same settings, or write to another --out")
        file, _, row = str(prov.get("source", "")).rpartition(":")
        if file != source or not row.isdigit() or int(row) <= last:
            raise DataError(out, num, "provenance.source", f"{prov.get('source')!r} is not a row of {source} after "
                            f"row {last}: the file was written from another input")
        last = int(row)
        q = questions[index[last]] if last in index else None  # rows past --limit are kept as they are
        if q is not None and (rec.get("answer") != q.answer or rec.get("prompt") != q.prompt):
            raise DataError(out, num, "answer" if rec.get("answer") != q.answer else "prompt",
                            f"differs from {source} row {last}: the input, --system-prompt or a field option changed")
    start = next((i for i, q in enumerate(questions) if q.row > last), len(questions))
    if torn:
        atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for _, r in rows))
    return len(rows), start, torn


def prepare(source: str | Path, out: str | Path, s: PRMSettings, *, question_field: str = "question",
            answer_field: str = "answer", system_prompt: str | None = None, limit: int | None = None,
            resume: bool = False) -> PRMJob:
    """Read the questions and check an existing ``out`` (which needs ``resume``) before any model is loaded."""
    source, out = str(source), Path(out)
    if out.suffix != ".jsonl":
        raise DataError(out, None, None, "the output is JSON lines: give it a .jsonl name")
    questions = read_questions(source, question_field=question_field, answer_field=answer_field,
                               system_prompt=system_prompt, limit=limit)
    done, start, torn = 0, 0, False
    if out.exists():
        if not resume:
            raise DataError(out, None, None, "already exists: pass --resume to continue it (with the same "
                            "settings), or choose another --out")
        done, start, torn = check_resume(out, questions, s, source)
    options = {"input": source, "question_field": question_field, "answer_field": answer_field,
               "system_prompt": system_prompt, "limit": limit}
    return PRMJob(source, out, s, questions, start, done, torn, options)


@dataclass
class PRMReport:
    out: str
    rows: int  # rows in the file now
    rows_resumed: int  # of them, written by an earlier run
    questions: int  # input rows labelled by this run (skipped ones included)
    skipped_empty: list[int]  # input rows whose solution had no step: counted, not written
    steps: int
    rollouts: int
    generated_tokens: int
    cut_at_max_new_tokens: int  # solutions and rollouts that ran out of budget
    solutions_correct: int
    steps_reaching_answer: int  # steps with at least one successful rollout
    wall_s: float
    s_per_row: float  # wall seconds per input row labelled by this run
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def label_file(job: PRMJob, engine: RolloutEngine, tokenizer: Any,
               progress: Callable[[str], None] | None = None) -> PRMReport:
    """Label the job's questions still to do, appending a row to ``job.out`` as each is done, then write the cost
    record ``<out>.meta.json`` (atomically)."""
    s, t0 = job.settings, time.perf_counter()
    todo = job.questions[job.start:]
    skipped, written, steps, tokens, cut, right, reached = [], 0, 0, 0, 0, 0, 0
    job.out.parent.mkdir(parents=True, exist_ok=True)
    with open(job.out, "a", encoding="utf-8") as f:
        for i, q in enumerate(todo, 1):
            lab = label_question(q, engine, tokenizer, s)
            tokens, cut = tokens + lab.tokens, cut + lab.cut
            right += correct([lab.solution], q.answer)[0]
            if not lab.steps:
                skipped.append(q.row)
            else:
                f.write(json.dumps(row_record(q, lab, s, job.source), ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
                written, steps, reached = written + 1, steps + len(lab.steps), reached + sum(map(bool, lab.successes))
            if progress:
                progress(f"row {q.row} ({i}/{len(todo)}): " + (f"{len(lab.steps)} steps, successes {lab.successes} "
                         f"of {s.k}" if lab.steps else "empty solution, skipped") +
                         f"; {time.perf_counter() - t0:.1f} s so far")
    wall = time.perf_counter() - t0
    report = PRMReport(str(job.out), job.resumed + written, job.resumed, len(todo), skipped, steps, steps * s.k, tokens,
                       cut, right, reached, round(wall, 3), round(wall / len(todo), 3) if todo else 0.0,
                       {**asdict(s), **job.options})
    atomic_write_text(meta_path(job.out), json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n")
    return report
