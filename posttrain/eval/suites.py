"""Evaluation suites: one data file and one model in, named metrics (with their direction) out.

A suite kind is a named function in ``SUITES``; a generation scorer is a named function in ``SCORERS``. Gates
(``posttrain.eval.gate``) compare the metrics of a candidate with a baseline's, so every metric says whether
higher is better. Every suite runs the model in eval mode without gradients and restores its training flag.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from posttrain.data import build_examples, build_pairs, eval_batches, pair_batches, read_rows
from posttrain.data.formats import Messages, detect_format, row_to_messages, row_to_prompt
from posttrain.data.render import has_chat_template, render_prompt
from posttrain.errors import DataError
from posttrain.eval.heldout import heldout_loss
from posttrain.rewards.functions import final_number
from posttrain.rollout import generate


@dataclass
class SuiteResult:
    metrics: dict[str, float]
    higher_is_better: dict[str, bool]
    outputs: list[str] | None = None       # generations, when the suite generates
    details: list[dict] = field(default_factory=list)  # small per-row records for the report


@dataclass
class SuiteArgs:
    """What ``run_suite`` passes every suite besides the model, tokenizer and file."""
    options: dict[str, Any]
    limit: int | None = None
    system_prompt: str | None = None
    chat_template: str | None = None
    reference_outputs: list[str] | None = None
    judge: Any = None
    batch_size: int = 8


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd graph; the caller's training flag comes back even on error."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _rows(path: str, limit: int | None) -> list[tuple[int, dict[str, Any]]]:
    rows = read_rows(path)
    return rows[:limit] if limit else rows


# --- scorers: (output, reference, options) -> score in [0, 1] ---

def _json(text: str) -> tuple[bool, Any]:
    try:
        return True, json.loads(text.strip())
    except (json.JSONDecodeError, ValueError):
        return False, None


def score_exact(output: str, reference: str, options: dict) -> float:
    return float(output.strip() == reference.strip())


def score_json_exact(output: str, reference: str, options: dict) -> float:
    (ok_out, got), (ok_ref, want) = _json(output), _json(reference)
    return float(ok_out and ok_ref and got == want)


def score_json_valid(output: str, reference: str, options: dict) -> float:
    return float(_json(output)[0])


def score_regex(output: str, reference: str, options: dict) -> float:
    return float(re.search(options["pattern"], output) is not None)


def score_number(output: str, reference: str, options: dict) -> float:
    """The output's final number (its ``####`` line, else its last number) equals the reference's."""
    got, want = final_number(output, strict=False), final_number(reference, strict=False)
    return float(got is not None and want is not None and math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9))


def score_contains(output: str, reference: str, options: dict) -> float:
    return float(reference.strip().lower() in output.lower())


SCORERS: dict[str, Callable[[str, str, dict], float]] = {
    "exact": score_exact, "json_exact": score_json_exact, "json_valid": score_json_valid, "regex": score_regex,
    "number": score_number, "contains": score_contains,
}
_NO_REFERENCE = {"json_valid", "regex"}  # scorers that judge the output alone


# --- prompts (and references) from the row formats the project reads ---

_REFERENCE_FIELDS = ("completion", "answer", "reference", "output")


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
    for num, row in _rows(path, limit):
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
            ref_fld = reference_field or next((f for f in _REFERENCE_FIELDS if f in row), None)
            ref = row.get(ref_fld) if ref_fld else None
            if ref is not None and not isinstance(ref, str):
                ref = json.dumps(ref) if isinstance(ref, (dict, list)) else str(ref)
        if need_reference and (ref is None or not ref.strip()):
            where = ref_fld or reference_field or ("messages" if "messages" in row else "answer")
            raise DataError(path, num, where, "missing or empty reference answer (a final assistant turn, or one of "
                            f"{reference_field or ', '.join(_REFERENCE_FIELDS)})")
        if system_prompt and chat[0]["role"] != "system":
            chat = [{"role": "system", "content": system_prompt}, *chat]
        out.append((num, chat, ref, row))
    return out


def _last_user(chat: Messages) -> str:
    return next(m["content"] for m in reversed(chat) if m["role"] == "user")


# --- the suites ---

def loss_suite(model, tokenizer, path: str, a: SuiteArgs) -> SuiteResult:
    """Mean cross-entropy per completion token (and perplexity) of chat or prompt/completion rows, rendered and
    masked exactly as SFT trains them (``build_examples``), the system prompt applied as the data layer does."""
    examples, _, _ = build_examples(path, tokenizer, fmt=a.options.get("format", "auto"),
                                    system_prompt=a.system_prompt, max_seq_len=a.options.get("max_seq_len", 2048),
                                    overlong=a.options.get("overlong", "error"), chat_template=a.chat_template)
    examples = examples[:a.limit] if a.limit else examples
    with evaluating(model):
        m = heldout_loss(model, eval_batches(examples, a.batch_size, _pad_id(tokenizer)))
    return SuiteResult({"loss": m["eval/loss"], "ppl": m["eval/ppl"], "tokens": float(m["eval/tokens"])},
                       # tokens is descriptive (how much the loss averages over), not a quality
                       {"loss": False, "ppl": False, "tokens": True})


def generation_suite(model, tokenizer, path: str, a: SuiteArgs) -> SuiteResult:
    """Greedy answers scored against each row's reference by ``options["scorer"]`` (see ``SCORERS``)."""
    name = a.options.get("scorer", "exact")
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; expected one of {', '.join(SCORERS)}")
    if name == "regex" and not isinstance(a.options.get("pattern"), str):
        raise ValueError("the regex scorer needs options.pattern (a regular expression searched in each output)")
    rows = read_prompts(path, limit=a.limit, system_prompt=a.system_prompt, prompt_field=a.options.get("prompt_field"),
                        reference_field=a.options.get("reference_field"), need_reference=name not in _NO_REFERENCE)
    with evaluating(model):
        outputs = generate(model, tokenizer, [chat for _, chat, _, _ in rows],
                           max_new_tokens=a.options.get("max_new_tokens", 64), batch_size=a.batch_size,
                           chat_template=a.chat_template)
    scorers = [name] + (["json_valid"] if name == "json_exact" else [])
    scores = {s: [SCORERS[s](out, ref or "", a.options) for (_, _, ref, _), out in zip(rows, outputs)] for s in scorers}
    details = [{"row": num, "prompt": _last_user(chat), "reference": ref, "output": out, "score": scores[name][i]}
               for i, ((num, chat, ref, _), out) in enumerate(zip(rows, outputs))]
    return SuiteResult({s: sum(v) / len(v) for s, v in scores.items()}, {s: True for s in scorers}, outputs, details)


def preference_suite(model, tokenizer, path: str, a: SuiteArgs) -> SuiteResult:
    """Share of pairs whose chosen response has the higher summed log-probability, and the mean margin
    (log p(chosen) - log p(rejected), in nats)."""
    from posttrain.methods import sequence_logps

    pairs, _ = build_pairs(path, tokenizer, max_seq_len=a.options.get("max_seq_len", 2048),
                           overlong=a.options.get("overlong", "error"), bad_pairs=a.options.get("bad_pairs", "error"),
                           system_prompt=a.system_prompt, chat_template=a.chat_template, limit=a.limit)
    margins: dict[int, float] = {}
    with evaluating(model):
        for batch in pair_batches(pairs, a.batch_size, _pad_id(tokenizer)):
            logps = sequence_logps(model, batch)[0].double().cpu()
            for k, index in enumerate(batch["pair_index"].tolist()):
                margins[index] = float(logps[2 * k] - logps[2 * k + 1])
    ordered = [margins[p.index] for p in pairs]
    details = [{"row": p.row, "margin": m, "prefers_chosen": m > 0} for p, m in zip(pairs, ordered)]
    return SuiteResult({"accuracy": sum(m > 0 for m in ordered) / len(ordered), "margin": sum(ordered) / len(ordered)},
                       {"accuracy": True, "margin": True}, None, details)


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MC_INSTRUCTION = "Answer with the letter of the correct choice only."


def expected_calibration_error(confidences: list[float], correct: list[bool], bins: int = 10) -> float:
    """ECE over ``bins`` equal-width confidence bins: sum_b |B|/n * |acc(B) - conf(B)|.

    Bins are left-closed, [k/bins, (k+1)/bins), with confidence 1.0 in the last bin (Guo et al. 2017, eq. 3).
    """
    if len(confidences) != len(correct):
        raise ValueError(f"{len(confidences)} confidences but {len(correct)} correctness flags")
    if not confidences:
        return float("nan")
    members: list[list[int]] = [[] for _ in range(bins)]
    for i, c in enumerate(confidences):
        members[min(int(c * bins), bins - 1)].append(i)
    n = len(confidences)
    return sum(len(b) / n * abs(sum(correct[i] for i in b) / len(b) - sum(confidences[i] for i in b) / len(b))
               for b in members if b)


def _mc_rows(path: str, limit: int | None) -> list[tuple[int, str, list[str], int]]:
    out = []
    for num, row in _rows(path, limit):
        question = row.get("question")
        if not isinstance(question, str) or not question.strip():
            raise DataError(path, num, "question", "missing or empty (expected the question text)")
        choices = row.get("choices")
        if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS) or \
                not all(isinstance(c, str) and c.strip() for c in choices):
            raise DataError(path, num, "choices", f"expected a list of 2 to {len(LETTERS)} non-empty strings")
        answer = row.get("answer")
        if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in LETTERS[:len(choices)]:
            index = LETTERS.index(answer.strip().upper())
        elif isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
            index = answer
        else:
            raise DataError(path, num, "answer", f"expected a choice index 0..{len(choices) - 1} or a letter "
                            f"{LETTERS[0]}..{LETTERS[len(choices) - 1]}, got {answer!r}")
        out.append((num, question, choices, index))
    return out


def _letter_ids(tokenizer, count: int) -> list[int]:
    ids = []
    for letter in LETTERS[:count]:
        tok = tokenizer(letter, add_special_tokens=False)["input_ids"]
        if len(tok) != 1:
            raise ValueError(f"multiple_choice: {letter!r} is {len(tok)} tokens for this tokenizer; the suite reads "
                             "one next-token probability per letter")
        ids.append(tok[0])
    return ids


def mc_prompt(question: str, choices: list[str]) -> str:
    listed = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return f"{question}\n\n{listed}\n\n{MC_INSTRUCTION}"


def multiple_choice_suite(model, tokenizer, path: str, a: SuiteArgs) -> SuiteResult:
    """Accuracy and calibration from the next-token probabilities of the choice letters right after the assistant
    turn opens, renormalised over the offered letters: no sampling and no parsing, so no unreadable answer."""
    rows = _mc_rows(path, a.limit)
    add_special = not has_chat_template(tokenizer, a.chat_template)
    device = next(model.parameters()).device
    letter_ids = _letter_ids(tokenizer, max(len(c) for _, _, c, _ in rows))
    details = []
    with evaluating(model):
        for k in range(0, len(rows), a.batch_size):
            chunk = rows[k:k + a.batch_size]
            enc = []
            for _, question, choices, _ in chunk:
                chat = [{"role": "user", "content": mc_prompt(question, choices)}]
                if a.system_prompt:
                    chat = [{"role": "system", "content": a.system_prompt}, *chat]
                enc.append(tokenizer(render_prompt(tokenizer, chat, a.chat_template),
                                     add_special_tokens=add_special)["input_ids"])
            width = max(map(len, enc))
            ids = torch.full((len(enc), width), _pad_id(tokenizer), dtype=torch.long)
            mask = torch.zeros((len(enc), width), dtype=torch.long)
            for i, e in enumerate(enc):  # right padding: positions stay 0..n-1, the last real token is read
                ids[i, :len(e)], mask[i, :len(e)] = torch.tensor(e), 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            for i, (num, _, choices, answer) in enumerate(chunk):
                offered = letter_ids[:len(choices)]
                probs = torch.softmax(logits[i, len(enc[i]) - 1, offered].double(), -1).tolist()
                pred = max(range(len(probs)), key=probs.__getitem__)
                # how much of the whole next-token distribution the offered letters hold: near 0, the model is not
                # answering with a letter and the renormalised probabilities say little
                mass = float(torch.softmax(logits[i, len(enc[i]) - 1].double(), -1)[offered].sum())
                details.append({"row": num, "probs": dict(zip(LETTERS, probs)), "answer": LETTERS[answer],
                                "letter_mass": mass,
                                "predicted": LETTERS[pred], "correct": pred == answer, "confidence": probs[pred],
                                "brier": sum((p - (j == answer)) ** 2 for j, p in enumerate(probs))})
    n = len(details)
    conf, correct = [d["confidence"] for d in details], [d["correct"] for d in details]
    metrics = {"accuracy": sum(correct) / n, "ece": expected_calibration_error(conf, correct),
               "confidence": sum(conf) / n,
               # multi-class Brier score: sum over the offered choices of (p - onehot)^2, in [0, 2]
               "brier": sum(d["brier"] for d in details) / n}
    # confidence is descriptive (a confident wrong model is no better); its direction only satisfies the table
    return SuiteResult(metrics, {"accuracy": True, "ece": False, "confidence": True, "brier": False}, None, details)


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
    from posttrain.judge import both_orders, win_rate

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


LM_EVAL_MISSING = "lm-eval-harness is not installed (pip install lm-eval); its task data must also be available locally"


def lm_eval_suite(model, tokenizer, path: str, a: SuiteArgs) -> SuiteResult:
    """Tasks of EleutherAI's lm-evaluation-harness (``options["tasks"]``) on the in-memory model through its HFLM
    wrapper; metrics are ``task/metric`` as the harness names them (e.g. ``hellaswag/acc,none``). ``path`` is unused:
    the harness reads its own task data."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise RuntimeError(LM_EVAL_MISSING) from None
    tasks = a.options.get("tasks")
    if isinstance(tasks, str):
        tasks = [tasks]
    if not tasks:
        raise ValueError("the lm_eval suite needs options.tasks (a list of lm-eval task names)")
    with evaluating(model):
        out = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=a.batch_size),
                                      tasks=list(tasks), limit=a.limit)
    metrics, hib = {}, {}
    for task, values in out["results"].items():
        directions = out.get("higher_is_better", {}).get(task, {})
        for key, value in values.items():
            if "_stderr" in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metrics[f"{task}/{key}"] = float(value)
            hib[f"{task}/{key}"] = bool(directions.get(key.split(",")[0], True))
    return SuiteResult(metrics, hib)


SUITES: dict[str, Callable[..., SuiteResult]] = {
    "loss": loss_suite, "generation": generation_suite, "preference": preference_suite,
    "multiple_choice": multiple_choice_suite, "abstention": abstention_suite, "judge": judge_suite,
    "lm_eval": lm_eval_suite,
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
