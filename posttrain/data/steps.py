"""Process-reward data: rows of a prompt, a solution's steps and one label per step, rendered with the token that
ends each step, and batched.

A row is ``{"prompt": text or chat messages ending with a user turn, "steps": [text, ...], "labels": [...]}`` with
one label per step; other columns ("answer", "provenance", ...) are left alone. A label is true or 1 (a correct
step), false or 0 (an incorrect one), a float in [0, 1] (a soft label: the probability the step is good, e.g.
Math-Shepherd's share of rollouts from it that reach the answer) or null (neutral; the PRM's ``neutral`` setting
says how it is trained). Anything else is refused with its file, row and ``labels[i]``.

The assistant message is the steps joined by a separator, rendered with the chat template like any response
(``render.chat_spans``; ``render.plain_spans`` without one). A step is scored at the token holding its last
character, found through the tokenizer's character offsets of the rendered text (exact under any token merges).
That token may not reach into the next step, since the score would then see text of the step after: two steps
in one token are refused with the row. Tokens after the last step's end are not kept (nothing reads them).

A solution written as one text is cut into steps by ``split_steps`` (``STEP_SPLITS``; its non-empty lines by
default): the one cut of ``posttrain data prm-labels`` and of the step rewards in online RL (``rewards.process``).

May import: posttrain.errors, posttrain.data.formats, render, packing, collate, schedule, readers.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from typing import Any, TypedDict

import torch

from posttrain.data.collate import PAD_BRANCH, pad_branch_rows
from posttrain.data.formats import Messages, row_to_prompt
from posttrain.data.packing import best_fit
from posttrain.data.readers import read_rows
from posttrain.data.render import chat_spans, has_chat_template, plain_spans
from posttrain.data.schedule import StepSchedule
from posttrain.errors import DataError, TemplateError
from posttrain.io import content_key

Label = float | None  # 1.0 correct, 0.0 incorrect, in between soft, None neutral
PRM800K_HINT = "PRM800K's ratings map +1 -> 1, 0 -> null (neutral), -1 -> 0"

# name -> (what separates two steps of a solution, what joins steps back into a prefix)
STEP_SPLITS: dict[str, tuple[str, str]] = {"line": (r"\n", "\n"), "paragraph": (r"\n\s*\n", "\n\n")}


def step_spans(text: str, split: str = "line") -> list[tuple[int, int]]:
    """Where the steps of a solution are: the (start, end) characters of each piece between two separators
    (``STEP_SPLITS[split]``) with its surrounding whitespace left out, blank pieces skipped; ``text[start:end]`` is
    the step, so a scorer's step can be traced back to the tokens that wrote it."""
    if split not in STEP_SPLITS:
        raise ValueError(f"step split {split!r}: expected one of {', '.join(STEP_SPLITS)}")
    spans, at = [], 0
    for stop, after in [*((m.start(), m.end()) for m in re.finditer(STEP_SPLITS[split][0], text)),
                        (len(text), len(text))]:
        piece = text[at:stop]
        if piece.strip():
            spans.append((at + len(piece) - len(piece.lstrip()), at + len(piece.rstrip())))
        at = after
    return spans


def split_steps(text: str, split: str = "line") -> list[str]:
    """The steps of a solution: its non-empty lines (``line``) or blank-line separated blocks (``paragraph``),
    stripped."""
    return [text[start:end] for start, end in step_spans(text, split)]


def parse_label(value: Any, file: str, num: int, i: int) -> Label:
    """One step's label as a float in [0, 1] or None (neutral); anything else is a DataError at ``labels[i]``."""
    if value is None:
        return None
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        if value == -1:
            raise DataError(file, num, f"labels[{i}]", f"-1 is not a label here; {PRM800K_HINT}")
        if math.isfinite(value) and 0 <= value <= 1:
            return float(value)
    raise DataError(file, num, f"labels[{i}]", "expected true/1 (a correct step), false/0 (an incorrect one), a "
                    f"probability in [0, 1] (a soft label) or null (neutral), got {value!r}")


def row_to_steps(row: dict[str, Any], file: str, num: int,
                 system_prompt: str | None = None) -> tuple[Messages, list[str], list[Label]]:
    """(prompt messages, steps, labels) of one row, validated; raises DataError naming the field."""
    if row.get("prompt") is None:
        raise DataError(file, num, "prompt", "missing field")
    prompt = row_to_prompt(row, file, num, "prompt", system_prompt)
    steps, labels = row.get("steps"), row.get("labels")
    if not isinstance(steps, list) or not steps:
        raise DataError(file, num, "steps", f"expected a non-empty list of step texts, got {steps!r:.80}")
    for i, s in enumerate(steps):
        if not isinstance(s, str) or not s.strip():
            raise DataError(file, num, f"steps[{i}]", f"expected a non-empty text, got {s!r:.80}")
    if not isinstance(labels, list):
        raise DataError(file, num, "labels", f"expected a list with one label per step, got {labels!r:.80}")
    if len(labels) != len(steps):
        raise DataError(file, num, "labels", f"{len(labels)} labels for {len(steps)} steps: give one label per step")
    return prompt, steps, [parse_label(v, file, num, i) for i, v in enumerate(labels)]


def render_steps(tokenizer, prompt: Messages, steps: list[str], separator: str = "\n",
                 chat_template: str | None = None, *, file: str = "", num: int | None = None
                 ) -> tuple[list[int], list[int]]:
    """Token ids of the chat (prompt + the joined steps as one assistant turn), up to and including the last step's
    end, and the index of the token holding each step's last character. ``file``/``num`` name the row in errors."""
    content = separator.join(steps)
    messages = [*prompt, {"role": "assistant", "content": content}]
    templated = has_chat_template(tokenizer, chat_template)
    text, spans = chat_spans(tokenizer, messages, chat_template) if templated else plain_spans(tokenizer, messages)
    at = text.find(content, spans[-1][0], spans[-1][1])
    if at < 0:
        raise TemplateError("the chat template changes the assistant text (it does not hold the joined steps "
                            "verbatim, e.g. it trims them), so the steps cannot be found in it")
    enc = tokenizer(text, add_special_tokens=not templated, return_offsets_mapping=True)
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    holder = [-1] * len(text)  # holder[c]: the last token whose characters include c (a split character: its end)
    for t, (s, e) in enumerate(offsets):
        holder[s:e] = [t] * (e - s)
    starts = [at + sum(len(s) + len(separator) for s in steps[:i]) for i in range(len(steps))]
    ends = []
    for i, (start, step) in enumerate(zip(starts, steps)):
        t = holder[start + len(step) - 1]
        if t < 0:
            raise DataError(file, num, f"steps[{i}]", "the step's last character is in no token (the tokenizer's "
                            "offsets skip it); end the step with a visible character")
        if i + 1 < len(steps) and offsets[t][1] > starts[i + 1]:
            raise DataError(file, num, f"steps[{i}]", f"steps {i} and {i + 1} meet inside one token "
                            f"({text[offsets[t][0]:offsets[t][1]]!r}), so step {i}'s score would see step {i + 1}; "
                            "set prm.step_separator to text that splits them (e.g. '\\n')")
        ends.append(t)
    return list(enc["input_ids"][:ends[-1] + 1]), ends


@dataclass
class StepExample:
    input_ids: list[int]  # up to and including the last step's end token
    step_ends: list[int]  # per step, the index of the token holding its last character (increasing)
    labels: list[Label]
    row: int = 0
    source: str = ""
    question: str = ""  # a key of the prompt: the solutions of one question are held out together

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class StepReport:
    """What happened to every row and step; printed before training, so nothing is cut or dropped unseen."""
    file: str
    rows: int = 0
    kept: int = 0
    labels: list[Label] = field(default_factory=list)  # of the kept steps
    truncated: list[int] = field(default_factory=list)
    cut_steps: int = 0
    dropped_overlong: list[int] = field(default_factory=list)
    tokens: int = 0

    def summary(self) -> str:
        hard = [x for x in self.labels if x in (0.0, 1.0)]
        neutral = sum(x is None for x in self.labels)
        parts = [f"{self.file}: {self.rows} rows, {self.kept} kept, {len(self.labels)} steps ({sum(hard):.0f} "
                 f"correct, {len(hard) - sum(hard):.0f} incorrect, {len(self.labels) - len(hard) - neutral} soft, "
                 f"{neutral} neutral), {self.tokens} tokens"]
        if self.truncated:
            shown = ", ".join(map(str, self.truncated[:10])) + (" ..." if len(self.truncated) > 10 else "")
            parts.append(f"{len(self.truncated)} rows cut at max_seq_len, {self.cut_steps} of their steps left out "
                         f"(rows {shown})")
        if self.dropped_overlong:
            parts.append(f"{len(self.dropped_overlong)} rows dropped as over-long")
        return "; ".join(parts)


def build_steps(path: str, tokenizer, *, separator: str = "\n", max_seq_len: int, overlong: str = "error",
                system_prompt: str | None = None, chat_template: str | None = None,
                limit: int | None = None) -> tuple[list[StepExample], StepReport]:
    """Validate every row first (a bad row stops the run before any tokenising), then render and apply the
    over-length policy: error, truncate (keep the steps whose end fits; the cut ones are counted) or drop."""
    rows = read_rows(path)[:limit] if limit else read_rows(path)
    report = StepReport(file=path, rows=len(rows))
    parsed = [(num, *row_to_steps(row, path, num, system_prompt)) for num, row in rows]
    out: list[StepExample] = []
    for num, prompt, steps, labels in parsed:
        try:
            ids, ends = render_steps(tokenizer, prompt, steps, separator, chat_template, file=path, num=num)
        except TemplateError as exc:
            raise DataError(path, num, "steps", str(exc)) from None
        if len(ids) > max_seq_len:
            if overlong == "error":
                raise DataError(path, num, None, f"{len(ids)} tokens to the last step's end, more than "
                                f"data.max_seq_len={max_seq_len}; raise it or set data.overlong to 'truncate' "
                                "(keeps the steps that fit) or 'drop'")
            if overlong == "drop":
                report.dropped_overlong.append(num)
                continue
            keep = sum(e < max_seq_len for e in ends)
            if keep == 0:
                raise DataError(path, num, "steps", f"the prompt and the first step do not fit in data.max_seq_len="
                                f"{max_seq_len}")
            report.truncated.append(num)
            report.cut_steps += len(ends) - keep
            ids, ends, labels = ids[:ends[keep - 1] + 1], ends[:keep], labels[:keep]
        out.append(StepExample(ids, ends, labels, num, path, content_key(prompt)))
        report.labels += labels
        report.tokens += len(ids)
    report.kept = len(out)
    if not out:
        raise DataError(path, None, None, "no row is left to train on (see data.overlong)")
    return out, report


class StepBatch(TypedDict):
    """Examples laid end to end in rows, each a segment of its own (positions restart; the layout of
    ``collate_pairs`` without a shared prompt, so ``models.forward.pair_hidden`` runs it)."""
    input_ids: torch.Tensor  # (B, T) long
    position_ids: torch.Tensor  # (B, T) long; from 0 in every example and in the padding
    branch: torch.Tensor  # (B, T) long; 1 on every example token, PAD_BRANCH on padding (no shared prompt)
    block: torch.Tensor  # (B, T) long; one id per example, per padding run
    step_index: torch.Tensor  # (S,) long; flat row * T + t position of each step's end token, examples in order
    step_label: torch.Tensor  # (S,) float; the step's label, NaN for a neutral step
    step_example: torch.Tensor  # (S,) long; the step's example, 0..E-1 in batch order
    num_tokens: torch.Tensor  # () long; non-padding tokens


def collate_steps(units: list[list[StepExample]], pad_id: int) -> StepBatch:
    """One row per unit (a packed list of examples); every example is a block of its own."""
    rows, index, index_row, labels, example = [], [], [], [], []
    block = 0
    for unit in units:
        ids: list[int] = []
        pos: list[int] = []
        blocks: list[int] = []
        for ex in unit:
            index += [len(ids) + e for e in ex.step_ends]
            index_row += [len(rows)] * len(ex.step_ends)
            labels += [math.nan if x is None else x for x in ex.labels]
            example += [block] * len(ex.step_ends)
            ids += ex.input_ids
            pos += range(len(ex))
            blocks += [block] * len(ex)
            block += 1
        rows.append((ids, pos, [1] * len(ids), blocks))
    out = pad_branch_rows(rows, pad_id, pad_branch=PAD_BRANCH, next_block=block)
    width = out["input_ids"].shape[1]
    out.update(step_index=torch.tensor(index, dtype=torch.long) + width * torch.tensor(index_row, dtype=torch.long),
               step_label=torch.tensor(labels, dtype=torch.float32),
               step_example=torch.tensor(example, dtype=torch.long),
               num_tokens=torch.tensor(sum(len(r[0]) for r in rows)))
    return out


def _pack(examples: list[StepExample], capacity: int) -> list[list[StepExample]]:
    return [[examples[i] for i in b] for b in best_fit([len(e) for e in examples], capacity)]


def step_batches(examples: list[StepExample], batch_size: int, pad_id: int,
                 max_seq_len: int | None = None) -> list[StepBatch]:
    """Fixed batches for evaluation and scoring. With ``max_seq_len``, examples are packed into rows of up to that
    many tokens, ``batch_size`` rows a batch; without, one example per row in length order."""
    if max_seq_len:
        rows = _pack(examples, max([max_seq_len, *map(len, examples)]))
    else:
        rows = [[e] for e in sorted(examples, key=len)]
    return [collate_steps(rows[k:k + batch_size], pad_id) for k in range(0, len(rows), batch_size)]


def step_schedule(examples: list[StepExample], *, micro_batch_size: int, grad_accum: int, seed: int, pad_id: int,
                  packing: bool, max_seq_len: int, world_size: int = 1, rank: int = 0) -> StepSchedule[StepBatch]:
    """Training batches by optimizer step; with packing, examples share rows of up to ``max_seq_len`` tokens."""
    units = _pack(examples, max_seq_len) if packing else [[e] for e in examples]
    return StepSchedule(units, functools.partial(collate_steps, pad_id=pad_id), micro_batch_size=micro_batch_size,
                        grad_accum=grad_accum, seed=seed, world_size=world_size, rank=rank,
                        unit_name="packed rows" if packing else "rows")
