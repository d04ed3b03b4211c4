"""Suites that generate: greedy answers scored against references, abstention on unanswerable prompts, and
win rate against a baseline's answers by a judge; with ``read_prompts``, the rows they read.

Layer 6 (eval): imports data, models, rollout, judge (inside judge_suite), errors and eval.
"""

from __future__ import annotations

import json
import re
from typing import Any

from posttrain.data.formats import Messages, detect_format, row_to_messages, row_to_prompt
from posttrain.errors import DataError
from posttrain.eval.common import SuiteArgs, SuiteResult, limited_rows
from posttrain.eval.scorers import NO_REFERENCE, REFERENCE_FIELDS, SCORERS
from posttrain.judge import both_orders, win_rate
from posttrain.models.forward import evaluating
from posttrain.rollout import generate


def read_prompts(path: str, *, limit: int | None = None, system_prompt: str | None = None,
                 prompt_field: str | None = None, reference_field: str | None = None,
                 need_reference: bool = False) -> list[tuple[int, Messages, str | None, dict[str, Any]]]:
    """(row number, prompt chat, reference or None, row) for every row, validated before anything runs.

    Rows: chat ``messages`` (the last assistant turn is the reference; a chat ending with a user turn is a prompt
    without one), Alpaca, ``prompt`` (text or messages) with
    a ``completion`` / ``answer`` / ``reference`` / ``output``, or GSM8K's ``question`` + ``answer``; or the columns
    named by ``prompt_field`` / ``reference_field``.
    """
    out = []
    for num, row in limited_rows(path, limit):
        fld = prompt_field or next((f for f in ("prompt", "question") if f in row), None)
        ref_fld = None
        ends_with_user = isinstance(row.get("messages"), list) and row["messages"] and \
            isinstance(row["messages"][-1], dict) and row["messages"][-1].get("role") == "user"
        if fld is None and ends_with_user:  # a prompt-only chat (judge and abstention files)
            chat, ref = row_to_prompt(row, path, num, "messages"), None
        elif fld is None and detect_format(row) in ("messages", "alpaca"):
            messages = row_to_messages(row, "auto", path, num)
            chat, ref = messages[:-1], messages[-1]["content"]
        else:
            chat = row_to_prompt(row, path, num, fld or "prompt")
            ref_fld = reference_field or next((f for f in REFERENCE_FIELDS if f in row), None)
            ref = row.get(ref_fld) if ref_fld else None
            if ref is not None and not isinstance(ref, str):
                ref = json.dumps(ref) if isinstance(ref, (dict, list)) else str(ref)
        if need_reference and (ref is None or not ref.strip()):
            where = ref_fld or reference_field or ("messages" if "messages" in row else "answer")
            raise DataError(path, num, where, "missing or empty reference answer (a final assistant turn, or one of "
                            f"{reference_field or ', '.join(REFERENCE_FIELDS)})")
        if system_prompt and chat[0]["role"] != "system":
            chat = [{"role": "system", "content": system_prompt}, *chat]
        out.append((num, chat, ref, row))
    return out


def _last_user(chat: Messages) -> str:
    return next(m["content"] for m in reversed(chat) if m["role"] == "user")


def generation_suite(model, tokenizer, path: str, a: SuiteArgs) -> SuiteResult:
    """Greedy answers scored against each row's reference by ``options["scorer"]`` (see ``SCORERS``)."""
    name = a.options.get("scorer", "exact")
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; expected one of {', '.join(SCORERS)}")
    if name == "regex" and not isinstance(a.options.get("pattern"), str):
        raise ValueError("the regex scorer needs options.pattern (a regular expression searched in each output)")
    rows = read_prompts(path, limit=a.limit, system_prompt=a.system_prompt, prompt_field=a.options.get("prompt_field"),
                        reference_field=a.options.get("reference_field"), need_reference=name not in NO_REFERENCE)
    with evaluating(model):
        outputs = generate(model, tokenizer, [chat for _, chat, _, _ in rows],
                           max_new_tokens=a.options.get("max_new_tokens", 64), batch_size=a.batch_size,
                           chat_template=a.chat_template)
    scorers = [name] + (["json_valid"] if name == "json_exact" else [])
    scores = {s: [SCORERS[s](out, ref or "", a.options) for (_, _, ref, _), out in zip(rows, outputs)] for s in scorers}
    details = [{"row": num, "prompt": _last_user(chat), "reference": ref, "output": out, "score": scores[name][i]}
               for i, ((num, chat, ref, _), out) in enumerate(zip(rows, outputs))]
    return SuiteResult({s: sum(v) / len(v) for s, v in scores.items()}, {s: True for s in scorers}, outputs, details)


ABSTAIN_PATTERNS = (
    r"\bI don'?t know\b", r"\bI do not know\b", r"\bI'?m not sure\b", r"\bI am not sure\b",
    r"\bcan(?:not|'t| not) (?:be )?(?:known|know|determined?|answer(?:ed)?|say|tell|predict(?:ed)?|provide)",
    r"\bno way (?:to|of) (?:know|tell|predict|determine)", r"\b(?:not possible|impossible) (?:for me )?to "
    r"(?:know|determine|say|tell|predict|answer)",
    r"\bI (?:don'?t|do not) have (?:the ability|access|any way|information|enough information|real-time)",
    r"\b(?:I'?m|I am) (?:not (?:able|capable|equipped)|unable) to\b",
    r"\bunknown\b", r"\bunanswerable\b", r"\bnot (?:enough|sufficient) information\b",
    r"\bno one (?:knows|can know)\b", r"\bnobody knows\b",
)
_DEFAULT_ABSTAIN = re.compile("|".join(ABSTAIN_PATTERNS), re.IGNORECASE)


def abstains(text: str, pattern: str | None = None) -> bool:
    """Whether an answer declines (case-insensitive search of ``pattern``, else of ``ABSTAIN_PATTERNS``)."""
    regex = re.compile(pattern, re.IGNORECASE) if pattern else _DEFAULT_ABSTAIN
    return regex.search(text.replace("\u2019", "'")) is not None  # models write "don’t" as often as "don't"


def abstention_suite(model, tokenizer, path: str, a: SuiteArgs) -> SuiteResult:
    """How often greedy answers decline unanswerable prompts (``abstention_rate``) and, when the file has
    answerable rows too, how often they decline those (``over_abstention``)."""
    rows = read_prompts(path, limit=a.limit, system_prompt=a.system_prompt, prompt_field=a.options.get("prompt_field"))
    answerable = []
    for num, _, _, row in rows:
        value = row.get("answerable", False)
        if not isinstance(value, bool):
            raise DataError(path, num, "answerable", f"expected true or false, got {value!r}")
        answerable.append(value)
    if all(answerable):
        raise DataError(path, None, "answerable", "no unanswerable row (answerable: false, the default): there is "
                        "no abstention to measure")
    with evaluating(model):
        outputs = generate(model, tokenizer, [chat for _, chat, _, _ in rows],
                           max_new_tokens=a.options.get("max_new_tokens", 64), batch_size=a.batch_size,
                           chat_template=a.chat_template)
    declined = [abstains(o, a.options.get("pattern")) for o in outputs]
    unans = [d for d, ok in zip(declined, answerable) if not ok]
    ans = [d for d, ok in zip(declined, answerable) if ok]
    metrics, hib = {"abstention_rate": sum(unans) / len(unans)}, {"abstention_rate": True}
    if ans:
        metrics["over_abstention"], hib["over_abstention"] = sum(ans) / len(ans), False
    details = [{"row": num, "prompt": _last_user(chat), "answerable": ok, "output": o, "abstained": d}
               for (num, chat, _, _), ok, o, d in zip(rows, answerable, outputs, declined)]
    return SuiteResult(metrics, hib, outputs, details)


DEFAULT_CRITERION = "Which answer is more helpful, correct and concise?"


def _judge_text(chat: Messages) -> str:
    turns = [m for m in chat if m["role"] != "system"]
    if len(turns) == 1:
        return turns[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in turns)


def judge_suite(model, tokenizer, path: str, a: SuiteArgs) -> SuiteResult:
    """Win rate of the model's greedy answers over ``reference_outputs`` (the baseline's answers to the same
    prompts), each pair judged in both orders (``posttrain.judge.both_orders``) so position bias cancels.

    With ``reference_outputs=None`` the model is the baseline, judged against itself: the answers are generated (a
    candidate's run needs them as its reference) but not judged; every pair is a tie, so win_rate is 0.5 and ties 1.
    A judge is required either way, so a missing one is caught on the baseline's run.
    """

    if a.judge is None:
        raise ValueError("the judge suite needs a judge (e.g. posttrain.judge.ModelJudge); none was given")
    rows = read_prompts(path, limit=a.limit, system_prompt=a.system_prompt, prompt_field=a.options.get("prompt_field"))
    if a.reference_outputs is not None and len(a.reference_outputs) != len(rows):
        raise ValueError(f"judge suite on {path}: {len(rows)} prompts but {len(a.reference_outputs)} reference "
                         "outputs; the baseline must answer the same prompts (same file and limit)")
    with evaluating(model):
        outputs = generate(model, tokenizer, [chat for _, chat, _, _ in rows],
                           max_new_tokens=a.options.get("max_new_tokens", 256), batch_size=a.batch_size,
                           chat_template=a.chat_template)
    hib = {"win_rate": True, "wins": True, "losses": False, "ties": True, "inconsistent": False}
    if a.reference_outputs is None:
        itself = {"win_rate": 0.5, "wins": 0.0, "losses": 0.0, "ties": 1.0, "inconsistent": 0.0}
        return SuiteResult(itself, hib, outputs,
                           [{"row": num, "prompt": _judge_text(chat), "output": o}
                            for (num, chat, _, _), o in zip(rows, outputs)])
    criterion = a.options.get("criterion", DEFAULT_CRITERION)
    verdicts = [both_orders(a.judge, _judge_text(chat), out, ref, criterion, margin=a.options.get("margin", 0.0))
                for (_, chat, _, _), out, ref in zip(rows, outputs, a.reference_outputs)]
    summary = win_rate(verdicts)
    # ties and inconsistent are recorded for the report; their directions only satisfy the table
    metrics = {k: summary[k] for k in hib}
    details = [{"row": num, "prompt": _judge_text(chat), "output": out, "reference": ref, "verdict": v.verdict,
                "p_output_first": v.p_a_first, "p_output_second": v.p_a_second}
               for (num, chat, _, _), out, ref, v in zip(rows, outputs, a.reference_outputs, verdicts)]
    return SuiteResult(metrics, hib, outputs, details)
