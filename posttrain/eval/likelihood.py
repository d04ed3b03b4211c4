"""Suites that read the model's probabilities of given text: held-out loss, preference accuracy, and
multiple-choice accuracy and calibration from the choice letters' next-token probabilities.

Layer 6 (eval): imports data, models, methods (inside preference_suite), errors and eval.
"""

from __future__ import annotations

import torch

from posttrain.data import build_examples, build_pairs, eval_batches, pair_batches
from posttrain.data.render import has_chat_template, render_prompt
from posttrain.errors import DataError
from posttrain.eval.common import SuiteArgs, SuiteResult, limited_rows
from posttrain.eval.heldout import heldout_loss
from posttrain.models.forward import evaluating, sequence_logps
from posttrain.models.loading import pad_id


def loss_suite(model, tokenizer, path: str, a: SuiteArgs) -> SuiteResult:
    """Mean cross-entropy per completion token (and perplexity) of chat or prompt/completion rows, rendered and
    masked exactly as SFT trains them (``build_examples``), the system prompt applied as the data layer does."""
    examples, _, _ = build_examples(path, tokenizer, fmt=a.options.get("format", "auto"),
                                    system_prompt=a.system_prompt, max_seq_len=a.options.get("max_seq_len", 2048),
                                    overlong=a.options.get("overlong", "error"), chat_template=a.chat_template)
    examples = examples[:a.limit] if a.limit else examples
    with evaluating(model):
        m = heldout_loss(model, eval_batches(examples, a.batch_size, pad_id(tokenizer)))
    return SuiteResult({"loss": m["eval/loss"], "ppl": m["eval/ppl"], "tokens": float(m["eval/tokens"])},
                       # tokens is descriptive (how much the loss averages over), not a quality
                       {"loss": False, "ppl": False, "tokens": True})


def preference_suite(model, tokenizer, path: str, a: SuiteArgs) -> SuiteResult:
    """Share of pairs whose chosen response has the higher summed log-probability, and the mean margin
    (log p(chosen) - log p(rejected), in nats)."""

    pairs, _ = build_pairs(path, tokenizer, max_seq_len=a.options.get("max_seq_len", 2048),
                           overlong=a.options.get("overlong", "error"), bad_pairs=a.options.get("bad_pairs", "error"),
                           system_prompt=a.system_prompt, chat_template=a.chat_template, limit=a.limit)
    margins: dict[int, float] = {}
    with evaluating(model):
        for batch in pair_batches(pairs, a.batch_size, pad_id(tokenizer)):
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
    for num, row in limited_rows(path, limit):
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
            ids = torch.full((len(enc), width), pad_id(tokenizer), dtype=torch.long)
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
