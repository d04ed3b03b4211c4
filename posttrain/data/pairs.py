"""Preference pairs: read, validate, render chosen and rejected with a response-only mask.

Row formats (picked per row):
- ``prompt`` / ``chosen`` / ``rejected``: the prompt is text or a list of chat messages (it may be multi-turn and
  must end with a user turn); each response is text or a list of assistant messages.
- ``chosen`` / ``rejected`` only, as full conversations: Anthropic HH text (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``)
  or message lists (read by ``formats.conversation``). Both must share the dialogue up to the last assistant turn,
  which becomes the prompt.

A message's content is text or a list of OpenAI text parts (joined as ``formats.content_text`` says).

Only the final response carries the preference, so only its tokens (and its end-of-turn) are scored, even when
the prompt holds earlier assistant turns. How pairs are laid out in batches is ``collate.collate_pairs``.

May import: posttrain.errors, posttrain.data.formats, readers, render.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from posttrain.data.formats import Messages, conversation, plain_messages, response_messages, validate_messages
from posttrain.data.readers import read_rows
from posttrain.data.render import Example, render_example
from posttrain.errors import BadPair, DataError, TemplateError


@dataclass
class Pair:
    chosen: Example
    rejected: Example
    prompt: Messages
    row: int
    index: int = 0  # position in its dataset: the key of precomputed reference log-probs

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)


def row_to_pair(row: dict[str, Any], file: str, num: int,
                system_prompt: str | None = None) -> tuple[Messages, Messages, Messages]:
    """(prompt, chosen response, rejected response) as messages, validated; raises DataError / BadPair."""
    for fld in ("chosen", "rejected"):
        if row.get(fld) is None:
            raise DataError(file, num, fld, "missing field")
    if row.get("prompt") is not None:
        prompt_raw = row["prompt"]
        if isinstance(prompt_raw, str):
            prompt = [{"role": "user", "content": prompt_raw}]
        elif isinstance(prompt_raw, list):
            prompt = plain_messages(prompt_raw, file, num, "prompt")
        else:
            raise DataError(file, num, "prompt",
                            f"expected text or a list of messages, got {type(prompt_raw).__name__}")
        chosen = response_messages(row["chosen"], file, num, "chosen")
        rejected = response_messages(row["rejected"], file, num, "rejected")
    else:
        c = conversation(row["chosen"], file, num, "chosen")
        r = conversation(row["rejected"], file, num, "rejected")
        if not c or c[-1].get("role") != "assistant" or not r or r[-1].get("role") != "assistant":
            raise BadPair(file, num, "chosen" if not c or c[-1].get("role") != "assistant" else "rejected",
                          "must end with an assistant turn")
        if c[:-1] != r[:-1]:
            raise BadPair(file, num, "rejected", "chosen and rejected do not share the dialogue before their last "
                          "assistant turn, so there is no common prompt")
        prompt, chosen, rejected = c[:-1], c[-1:], r[-1:]
        for fld, resp in (("chosen", chosen), ("rejected", rejected)):
            if not isinstance(resp[0].get("content"), str) or not resp[0]["content"].strip():
                raise BadPair(file, num, fld, "empty response")
    if system_prompt and (not prompt or not isinstance(prompt[0], dict) or prompt[0].get("role") != "system"):
        prompt = [{"role": "system", "content": system_prompt}, *prompt]
    # Full-chat validation gives the role-order and content errors their row, field and wording, and the
    # normalised {role, content} messages returned.
    full_chosen = validate_messages(prompt + chosen, file, num, "prompt+chosen")
    full_rejected = validate_messages(prompt + rejected, file, num, "prompt+rejected")
    prompt, chosen, rejected = full_chosen[:len(prompt)], full_chosen[len(prompt):], full_rejected[len(prompt):]
    if [m["content"].strip() for m in chosen] == [m["content"].strip() for m in rejected]:
        raise BadPair(file, num, "rejected", "identical to chosen: the pair carries no preference")
    return prompt, chosen, rejected


def render_response(tokenizer, prompt: Messages, response: Messages, chat_template: str | None = None) -> Example:
    """The chat rendered with only its final assistant turn trained (the last contiguous run of trained tokens)."""
    ex = render_example(tokenizer, prompt + response, chat_template)
    last = max((t for t, on in enumerate(ex.trained) if on), default=None)
    if last is None:
        raise TemplateError("the response renders to no token")
    first = last
    while first > 0 and ex.trained[first - 1]:
        first -= 1
    ex.trained = [first <= t <= last for t in range(len(ex.trained))]
    return ex


@dataclass
class PairReport:
    file: str
    rows: int = 0
    kept: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)
    truncated: list[int] = field(default_factory=list)
    dropped_overlong: list[int] = field(default_factory=list)
    tokens: int = 0

    def summary(self) -> str:
        parts = [f"{self.file}: {self.rows} pairs, {self.kept} kept, {self.tokens} tokens"]
        if self.bad:
            shown = "; ".join(f"row {n}: {why}" for n, why in self.bad[:3])
            more = f"; ... +{len(self.bad) - 3}" if len(self.bad) > 3 else ""
            parts.append(f"{len(self.bad)} bad pairs dropped ({shown}{more})")
        if self.truncated:
            parts.append(f"{len(self.truncated)} truncated")
        if self.dropped_overlong:
            parts.append(f"{len(self.dropped_overlong)} dropped as over-long")
        return "; ".join(parts)


def build_pairs(path: str, tokenizer, *, max_seq_len: int, overlong: str = "error", bad_pairs: str = "error",
                system_prompt: str | None = None, chat_template: str | None = None,
                limit: int | None = None) -> tuple[list[Pair], PairReport]:
    """Validate every row first (so a bad row stops the run before any tokenising), then render the pairs."""
    rows = read_rows(path)[:limit] if limit else read_rows(path)
    report = PairReport(file=path, rows=len(rows))
    parsed = []
    for num, row in rows:
        try:
            parsed.append((num, *row_to_pair(row, path, num, system_prompt)))
        except BadPair as exc:
            if bad_pairs == "error":
                raise DataError(path, num, exc.field,
                                exc.problem + " (data.bad_pairs: drop skips such pairs)") from None
            report.bad.append((num, exc.problem))
    pairs: list[Pair] = []
    for num, prompt, chosen, rejected in parsed:
        try:
            c = render_response(tokenizer, prompt, chosen, chat_template)
            r = render_response(tokenizer, prompt, rejected, chat_template)
        except TemplateError as exc:
            raise DataError(path, num, None, str(exc)) from None
        if max(len(c), len(r)) > max_seq_len:
            if overlong == "error":
                raise DataError(path, num, None, f"{max(len(c), len(r))} tokens, more than data.max_seq_len="
                                f"{max_seq_len}; raise it or set data.overlong to 'truncate' or 'drop'")
            if overlong == "drop":
                report.dropped_overlong.append(num)
                continue
            for ex in (c, r):  # keep the prompt, cut the end of the response
                ex.input_ids, ex.trained = ex.input_ids[:max_seq_len], ex.trained[:max_seq_len]
            if not (c.num_trained and r.num_trained):
                raise DataError(path, num, None, f"the prompt alone fills data.max_seq_len={max_seq_len}")
            report.truncated.append(num)
        for ex in (c, r):
            ex.row, ex.source = num, path
        pairs.append(Pair(c, r, prompt, num, index=len(pairs)))
        report.tokens += len(c) + len(r)
    report.kept = len(pairs)
    if not pairs:
        raise DataError(path, None, None, "no pair is left to train on (see the bad-pair and over-long policies)")
    return pairs, report
