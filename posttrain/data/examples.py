"""SFT data: read, validate, render with masks and apply the over-length policy, with a report of every row.

May import: posttrain.errors, posttrain.data.formats, readers, render, tool_rows.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from posttrain.data.formats import Messages, row_to_chat
from posttrain.data.readers import read_rows
from posttrain.data.render import Example, render_example
from posttrain.data.tool_rows import Tools
from posttrain.errors import DataError, TemplateError


@dataclass
class DataReport:
    """What happened to every row; printed before training so nothing is dropped silently."""
    file: str
    rows: int = 0
    kept: int = 0
    truncated: list[int] = field(default_factory=list)
    dropped_overlong: list[int] = field(default_factory=list)
    rewritten: list[tuple[int, str]] = field(default_factory=list)  # (row, what the template changed), masked
    tokens: int = 0
    trained_tokens: int = 0

    def summary(self) -> str:
        parts = [f"{self.file}: {self.rows} rows, {self.kept} kept, {self.tokens} tokens "
                 f"({self.trained_tokens} trained)"]
        if self.truncated:
            parts.append(f"{len(self.truncated)} truncated (rows {_rows(self.truncated)})")
        if self.dropped_overlong:
            parts.append(f"{len(self.dropped_overlong)} dropped as over-long (rows {_rows(self.dropped_overlong)})")
        if self.rewritten:
            parts.append(f"{len(self.rewritten)} with assistant turns the chat template rewrote, left out of the "
                         f"loss (rows {_rows([r for r, _ in self.rewritten])}; row {self.rewritten[0][0]}: "
                         f"{self.rewritten[0][1]})")
        return "; ".join(parts)


def _rows(nums: list[int], limit: int = 10) -> str:
    head = ", ".join(map(str, nums[:limit]))
    return head + (f", ... +{len(nums) - limit}" if len(nums) > limit else "")


def load_messages(path: str, fmt: str = "auto",
                  system_prompt: str | None = None) -> list[tuple[int, Messages, Tools | None]]:
    """(row number, validated messages, the row's tools or None) for every row of ``path``."""
    return [(num, *row_to_chat(row, fmt, path, num, system_prompt)) for num, row in read_rows(path)]


def build_examples(path: str, tokenizer, *, fmt: str = "auto", system_prompt: str | None = None,
                   max_seq_len: int, overlong: str = "error", chat_template: str | None = None,
                   rewritten_turns: str = "error"
                   ) -> tuple[list[Example], list[tuple[int, Messages, Tools | None]], DataReport]:
    """Validate every row before tokenising any, then render; returns examples, their (row, messages, tools), and a
    report.
    ``rewritten_turns``: an assistant turn the chat template changed (a dropped ``<think>`` block) stops the run
    (``error``) or stays as context out of the loss (``mask``), counted in the report and warned about."""
    rows = load_messages(path, fmt, system_prompt)
    report = DataReport(file=path, rows=len(rows))
    examples, kept_rows = [], []
    for num, messages, tools in rows:
        try:
            ex = render_example(tokenizer, messages, chat_template, rewritten=rewritten_turns, tools=tools)
        except TemplateError as exc:
            raise DataError(path, num, "messages", str(exc)) from None
        ex.row, ex.source = num, path
        if ex.rewritten:
            report.rewritten.append((num, "; ".join(f"messages[{i}]: {p}" for i, p in ex.rewritten)))
        if len(ex) > max_seq_len:
            if overlong == "error":
                raise DataError(path, num, None, f"{len(ex)} tokens, more than data.max_seq_len={max_seq_len}; "
                                "raise max_seq_len or set data.overlong to 'truncate' or 'drop'")
            if overlong == "drop":
                report.dropped_overlong.append(num)
                continue
            ex.input_ids, ex.trained = ex.input_ids[:max_seq_len], ex.trained[:max_seq_len]
            report.truncated.append(num)
        if ex.num_trained == 0:
            hint = " after truncation to max_seq_len" if num in report.truncated else ""
            hint += " (the chat template rewrote the other turns; see data.rewritten_turns)" if ex.rewritten else ""
            raise DataError(path, num, "messages", f"no assistant token is left to train on{hint}")
        examples.append(ex)
        kept_rows.append((num, messages, tools))
        report.tokens += len(ex)
        report.trained_tokens += ex.num_trained
    report.kept = len(examples)
    if report.rewritten:
        first = "; ".join(f"row {r}: {what}" for r, what in report.rewritten[:3])
        warnings.warn(f"{path}: the chat template rewrote assistant turns of {len(report.rewritten)} rows, which "
                      f"are left out of the loss ({first})", stacklevel=2)
    if not examples:
        raise DataError(path, None, None, "no example is left to train on (see the over-long policy)")
    return examples, kept_rows, report
