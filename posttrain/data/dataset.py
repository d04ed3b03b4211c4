"""SFT data: read, validate, render with masks, apply the over-length policy, split, and batch."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch

from posttrain.data.formats import Messages, row_to_messages, row_to_prompt
from posttrain.data.packing import best_fit, collate
from posttrain.data.readers import read_rows
from posttrain.data.render import Example, render_example
from posttrain.errors import DataError, TemplateError


@dataclass
class DataReport:
    """What happened to every row; printed before training so nothing is dropped silently."""
    file: str
    rows: int = 0
    kept: int = 0
    truncated: list[int] = field(default_factory=list)
    dropped_overlong: list[int] = field(default_factory=list)
    tokens: int = 0
    trained_tokens: int = 0

    def summary(self) -> str:
        parts = [f"{self.file}: {self.rows} rows, {self.kept} kept, {self.tokens} tokens "
                 f"({self.trained_tokens} trained)"]
        if self.truncated:
            parts.append(f"{len(self.truncated)} truncated (rows {_rows(self.truncated)})")
        if self.dropped_overlong:
            parts.append(f"{len(self.dropped_overlong)} dropped as over-long (rows {_rows(self.dropped_overlong)})")
        return "; ".join(parts)


def _rows(nums: list[int], limit: int = 10) -> str:
    head = ", ".join(map(str, nums[:limit]))
    return head + (f", ... +{len(nums) - limit}" if len(nums) > limit else "")


def load_messages(path: str, fmt: str = "auto", system_prompt: str | None = None) -> list[tuple[int, Messages]]:
    return [(num, row_to_messages(row, fmt, path, num, system_prompt)) for num, row in read_rows(path)]


def load_prompt_chats(path: str, field: str = "prompt", system_prompt: str | None = None) -> list[tuple[int, Messages]]:
    """(row number, chat to answer) for every row of a prompts file (see formats.row_to_prompt for what a row may
    be); a .txt file is one prompt per non-empty line."""
    if str(path).endswith(".txt"):
        from pathlib import Path

        lines = [(i, line.strip()) for i, line in enumerate(Path(path).read_text().splitlines(), 1) if line.strip()]
        rows = [(i, {field: text}) for i, text in lines]
    else:
        rows = read_rows(path)
    return [(num, row_to_prompt(row, path, num, field, system_prompt)) for num, row in rows]


def build_examples(path: str, tokenizer, *, fmt: str = "auto", system_prompt: str | None = None,
                   max_seq_len: int, overlong: str = "error",
                   chat_template: str | None = None) -> tuple[list[Example], list[tuple[int, Messages]], DataReport]:
    """Validate every row before tokenising any, then render; returns examples, their messages, and a report."""
    rows = load_messages(path, fmt, system_prompt)
    report = DataReport(file=path, rows=len(rows))
    examples, kept_rows = [], []
    for num, messages in rows:
        try:
            ex = render_example(tokenizer, messages, chat_template)
        except TemplateError as exc:
            raise DataError(path, num, "messages", str(exc)) from None
        ex.row, ex.source = num, path
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
            raise DataError(path, num, "messages", f"no assistant token is left to train on{hint}")
        examples.append(ex)
        kept_rows.append((num, messages))
        report.tokens += len(ex)
        report.trained_tokens += ex.num_trained
    report.kept = len(examples)
    if not examples:
        raise DataError(path, None, None, "no example is left to train on (see the over-long policy)")
    return examples, kept_rows, report


def holdout_split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, held-out); a fixed seed gives the same split on every run and machine."""
    if fraction <= 0 or n < 2:
        return list(range(n)), []
    order = list(range(n))
    random.Random(seed).shuffle(order)
    k = min(n - 1, max(1, round(n * fraction)))
    return sorted(order[k:]), sorted(order[:k])


class BatchPlan:
    """Deterministic batches by optimizer step, so a resumed run sees exactly the data it would have seen.

    Units are packed rows (lists of examples) or single examples. Epoch e visits the units in the order of a
    permutation seeded by (seed, e); step s takes the next ``micro_batch_size * grad_accum`` units of that
    endless sequence. Nothing about the position needs saving beyond the step number.

    With fewer units than a step takes, each step holds some units twice or more (it wraps into the next epoch's
    permutation). That is allowed rather than refused, since tiny sets (smoke tests, a handful of examples) are
    common and still give a valid objective, but ``repeat_warning`` says so before training.
    """

    def __init__(self, examples: list[Example], *, micro_batch_size: int, grad_accum: int, seed: int,
                 pad_id: int, packing: bool, max_seq_len: int, world_size: int = 1, rank: int = 0):
        self.examples = examples
        if packing:
            self.units = [[examples[i] for i in b] for b in best_fit([len(e) for e in examples], max_seq_len)]
        else:
            self.units = [[e] for e in examples]
        self.unit_name = "packed rows" if packing else "examples"
        self.micro, self.accum, self.seed, self.pad_id = micro_batch_size, grad_accum, seed, pad_id
        self.world_size, self.rank = world_size, rank
        self.per_step = micro_batch_size * grad_accum * world_size
        self._orders: dict[int, list[int]] = {}

    def steps_for(self, epochs: float) -> int:
        return max(1, math.ceil(epochs * len(self.units) / self.per_step))

    def epochs_text(self, steps: int, epochs: float) -> str:
        """The epochs ``steps`` optimizer steps really cover, e.g. ``0.35 epochs (max_steps cuts 2.0)``, for the
        line printed before training: max_steps overrides train.epochs, and steps are whole."""
        covered = self.epoch_of(steps)
        if abs(covered - epochs) < 0.005:
            return f"{epochs} epochs"
        planned = self.steps_for(epochs)
        why = ("rounded up to whole steps" if steps == planned else
               f"max_steps cuts {epochs}" if steps < planned else f"max_steps runs past {epochs}")
        return f"{covered:.3g} epochs ({why})"

    def repeat_warning(self) -> str:
        """'' or, when a step needs more units than there are, a line saying every step repeats some of them."""
        n = len(self.units)
        if n >= self.per_step:
            return ""
        uneven = ", some more often than others" if self.per_step % n else ""
        ranks = " x ranks" if self.world_size > 1 else ""
        return (f"\nwarning: only {n} {self.unit_name} for a step of {self.per_step}: each step repeats rows"
                f"{uneven}; make micro_batch_size x grad_accum{ranks} at most {n} to use each once per step")

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(len(self.units), generator=g).tolist()}
        return self._orders[epoch]

    def _unit(self, k: int) -> list[Example]:
        epoch, i = divmod(k, len(self.units))
        return self.units[self._order(epoch)[i]]

    def step(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches for optimizer step ``step``."""
        first = step * self.per_step
        batches = []
        for m in range(self.accum):
            start = first + (m * self.world_size + self.rank) * self.micro
            batches.append(self._collate([self._unit(k) for k in range(start, start + self.micro)]))
        return batches

    def _collate(self, units: list) -> dict[str, torch.Tensor]:
        return collate(units, self.pad_id)

    def epoch_of(self, step: int) -> float:
        return step * self.per_step / len(self.units)


def eval_batches(examples: list[Example], batch_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Held-out batches in file order, unpacked (sorted by length to waste little padding)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    return [collate([[examples[i]] for i in order[k:k + batch_size]], pad_id) for k in range(0, len(order), batch_size)]
