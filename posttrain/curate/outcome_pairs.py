"""Preference pairs for an outcome reward model (ORM) from the step-label files of a process reward model (PRM), so
that the two are trained on the same solutions and can be compared: the PRM sees every step's label, the ORM only
whether the whole solution reaches the reference answer.

Input rows are those ``posttrain data prm-labels`` writes (``curate.prm_labels.row_record``): a prompt, a solution's
steps, the GSM8K reference answer and a provenance naming the question's source row, whose solution it is
(``sampled`` or ``reference``) and how it was cut into steps. A solution's text is its steps joined back by its
split's joiner; it is right when the gsm8k_answer verifier accepts it (the '####' number, else the last number),
as prm_labels judges its own solutions.

Rows are grouped by question: the provenance source (``path:row``) when there is one, so a reference-solution file
and a sampled-solution file of the same questions join; else the prompt's content key. Per question the chosen
response is the first right solution the model sampled (a positive on the model's own distribution, as the
rejected one is), else the first right one (the reference); the rejected one is the first wrong solution. A
question whose solutions are all right or all wrong carries no preference and is counted, not written.

Layer 6 (curate): may import data, rewards, errors and io; never config.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from posttrain.data.readers import read_rows
from posttrain.data.steps import STEP_SPLITS
from posttrain.errors import DataError
from posttrain.io import atomic_write_text, content_key
from posttrain.rewards.functions import final_number, gsm8k_answer


@dataclass(frozen=True)
class Solution:
    file: str
    row: int
    key: str  # the question it answers
    prompt: str | list[dict[str, Any]]
    answer: Any
    text: str
    source: str | None  # the provenance source, "path:row" of the question
    kind: str | None  # the provenance solution: "sampled", "reference", or None when not recorded

    def provenance(self) -> dict[str, Any]:
        return {"source": self.source, "solution": self.kind, "row": f"{self.file}:{self.row}"}


def _prompt(row: dict[str, Any], file: str, num: int) -> str | list[dict[str, Any]]:
    prompt = row.get("prompt")
    if isinstance(prompt, str) and prompt.strip():
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        return prompt
    raise DataError(file, num, "prompt", "missing field" if prompt is None else
                    f"expected text or a list of chat messages, got {type(prompt).__name__} {str(prompt)[:60]!r}")


def _answer(row: dict[str, Any], file: str, num: int) -> Any:
    ref = row.get("answer")
    if ref is None:
        raise DataError(file, num, "answer", "missing field (the reference answer, '... #### 72')")
    if isinstance(ref, bool) or not isinstance(ref, (str, int, float)):
        raise DataError(file, num, "answer", f"expected the reference answer text, got {type(ref).__name__}")
    if final_number(str(ref), strict=False) is None:  # every solution would be judged wrong
        raise DataError(file, num, "answer", f"no number in the reference answer {str(ref)[-60:]!r}")
    return ref


def _steps(row: dict[str, Any], file: str, num: int) -> list[str]:
    steps = row.get("steps")
    if not isinstance(steps, list):
        raise DataError(file, num, "steps", "missing field" if steps is None else
                        f"expected a list of step texts, got {type(steps).__name__}")
    for i, step in enumerate(steps):
        if not isinstance(step, str):
            raise DataError(file, num, f"steps[{i}]", f"expected text, got {type(step).__name__}")
    return steps


def _provenance(row: dict[str, Any], file: str, num: int) -> tuple[str | None, str | None, str]:
    """(source, solution kind, step split) from the row's provenance; a row without one is a line-split solution
    of unknown kind, as prm-labels writes by default."""
    prov = row.get("provenance", {})
    if not isinstance(prov, dict):
        raise DataError(file, num, "provenance", f"expected an object, got {type(prov).__name__}")
    split = prov.get("step_split", "line")
    if split not in STEP_SPLITS:
        raise DataError(file, num, "provenance.step_split", f"{split!r}: expected one of {', '.join(STEP_SPLITS)}")
    source, kind = prov.get("source"), prov.get("solution")
    for name, value in (("source", source), ("solution", kind)):
        if value is not None and not isinstance(value, str):
            raise DataError(file, num, f"provenance.{name}", f"expected text, got {type(value).__name__}")
    return source or None, kind, split


def is_correct(text: str, answer: Any) -> bool:
    """Whether a solution reaches the reference answer, judged as prm_labels judges its solutions."""
    return bool(gsm8k_answer([None], [text], answer=[answer], strict=False)[0])


def read_solutions(path: str | Path) -> tuple[list[Solution], int]:
    """The file's solutions with at least one step, and how many rows had none (counted, skipped)."""
    file, out, empty = str(path), [], 0
    for num, row in read_rows(path):
        prompt, answer, steps = _prompt(row, file, num), _answer(row, file, num), _steps(row, file, num)
        source, kind, split = _provenance(row, file, num)
        if not steps:
            empty += 1
            continue
        key = f"source:{source}" if source else f"prompt:{content_key(prompt)}"
        out.append(Solution(file, num, key, prompt, answer, STEP_SPLITS[split][1].join(steps), source, kind))
    return out, empty


def group_questions(solutions: list[Solution]) -> dict[str, list[Solution]]:
    """Solutions by question, in order of each question's first appearance; the rows of one question must agree
    on its prompt and reference answer (else the source names two different questions)."""
    groups: dict[str, list[Solution]] = {}
    for s in solutions:
        first = groups.setdefault(s.key, [s])[0]
        if first is s:
            continue
        for name in ("prompt", "answer"):
            if getattr(s, name) != getattr(first, name):
                raise DataError(s.file, s.row, name, f"differs from the {name} of {first.file} row {first.row}, "
                                f"the same question ({s.source or 'same prompt'}): the files were written from "
                                "different inputs or with a different --system-prompt")
        groups[s.key].append(s)
    return groups


def pick_pair(solutions: list[Solution]) -> tuple[Solution | None, Solution | None]:
    """(chosen, rejected) of one question: the first right sampled solution, else the first right one; the first
    wrong one. Either is None when the question has no such solution."""
    judged = [(s, is_correct(s.text, s.answer)) for s in solutions]
    right, wrong = [s for s, ok in judged if ok], [s for s, ok in judged if not ok]
    chosen = next((s for s in right if s.kind == "sampled"), right[0] if right else None)
    return chosen, wrong[0] if wrong else None


def pair_record(chosen: Solution, rejected: Solution) -> dict[str, Any]:
    """One output row, in the prompt/chosen/rejected format ``posttrain reward`` reads."""
    return {"prompt": chosen.prompt, "chosen": chosen.text, "rejected": rejected.text,
            "provenance": {"chosen": chosen.provenance(), "rejected": rejected.provenance(), "from": "outcome-pairs"}}


@dataclass
class OutcomePairsReport:
    out: str
    questions: int  # questions with at least one solution: pairs + all_correct + all_wrong
    pairs: int
    all_correct: int  # questions with no wrong solution: no pair
    all_wrong: int  # questions with no right solution: no pair
    empty: int  # rows with no steps, skipped
    chosen_sampled: int  # pairs whose chosen solution the model sampled (the rest are references or unrecorded)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def outcome_pairs(paths: list[str | Path], out: str | Path) -> OutcomePairsReport:
    """Read every file (all rows are checked before anything is written), pair each question's solutions, and
    write the pairs to ``out`` atomically."""
    out = Path(out)
    if out.suffix != ".jsonl":
        raise DataError(out, None, None, "the output is JSON lines: give it a .jsonl name")
    solutions, empty = [], 0
    for path in paths:
        found, skipped = read_solutions(path)
        solutions, empty = solutions + found, empty + skipped
    records, all_correct, all_wrong, sampled = [], 0, 0, 0
    groups = group_questions(solutions)
    for group in groups.values():
        chosen, rejected = pick_pair(group)
        if chosen is None:
            all_wrong += 1
        elif rejected is None:
            all_correct += 1
        else:
            records.append(pair_record(chosen, rejected))
            sampled += chosen.kind == "sampled"
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return OutcomePairsReport(str(out), len(groups), len(records), all_correct, all_wrong, empty, sampled)
