"""Unpaired preference data for KTO (Ethayarajh et al. 2024): one completion per row, labelled desirable or not.

Row format, as TRL's unpaired preference type (``prompt`` / ``completion`` / ``label``, standard or conversational)
so its KTO data sets read as they are:
- ``prompt``: text, or a list of chat messages (may be multi-turn; must end with a user turn);
- ``completion``: text, or a list of assistant messages;
- ``label``: ``true`` (a desirable completion) or ``false`` (an undesirable one).

Labels must be booleans. Integers (0/1) and words ("yes", "good") are refused rather than read: an integer column
in preference data is as often a rating (1-5, or a 0/1 "flagged" bit whose polarity nobody wrote down) as a label,
and a guessed polarity would push KTO toward the completions it should push away from, with nothing in the logs to
show it. A CSV file has no booleans, so there, and only there, the texts ``true`` and ``false`` (any case) are read.

Each row is rendered with ``pairs.render_response``, so a completion gets the tokens and mask that DPO gives the same
response after the same prompt. ``posttrain data unpair`` (``curate.unpair``) writes this format from pair files.

May import: posttrain.errors, posttrain.data.formats, readers, render, pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.data.formats import Messages, plain_messages, response_messages, validate_messages
from posttrain.data.pairs import render_response
from posttrain.data.readers import read_rows
from posttrain.data.render import Example
from posttrain.errors import BadPair, DataError, TemplateError

# Below this share of rows for either class, the class weights decide how much the minority class is heard.
MINORITY_SHARE = 0.10
# The paper's range for lambda_D * n_D / (lambda_U * n_U).
WEIGHT_RATIO_RANGE = (1.0, 4.0 / 3.0)
_CSV_LABELS = {"true": True, "false": False}


@dataclass
class Unpaired:
    example: Example  # prompt + completion rendered; ``trained`` marks the completion and its end-of-turn
    prompt: Messages
    label: bool  # True: desirable
    row: int
    source: str
    index: int = 0  # position in its dataset: the key of precomputed reference log-probs

    @property
    def _span(self) -> tuple[int, int]:
        on = [t for t, trained in enumerate(self.example.trained) if trained]
        return on[0], on[-1] + 1

    @property
    def prompt_ids(self) -> list[int]:
        """The tokens before the completion: the chat template's rendering of the prompt and the assistant header."""
        return self.example.input_ids[:self._span[0]]

    @property
    def completion_ids(self) -> list[int]:
        """The completion's tokens (and its end-of-turn), the ones KTO sums log-probs over. ``prompt_ids +
        completion_ids`` is the rendering up to the end of the turn; a template's trailing newline is left out, so
        another row's completion can follow this prompt (KTO's mismatched pairs for z0)."""
        start, end = self._span
        return self.example.input_ids[start:end]

    def __len__(self) -> int:
        return len(self.example)


def _is_csv(file: str) -> bool:
    suffixes = Path(file).suffixes
    return bool(suffixes) and (suffixes[-1] == ".csv" or suffixes[-2:] == [".csv", ".gz"])


def parse_label(value: Any, file: str, num: int) -> bool:
    """A row's label as a bool; see the module docstring for why only booleans (and CSV's true/false) are read."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and _is_csv(file) and value.strip().lower() in _CSV_LABELS:
        return _CSV_LABELS[value.strip().lower()]
    if value is None:
        raise DataError(file, num, "label", "missing field: true for a desirable completion, false for an "
                        "undesirable one")
    hint = ("; 0/1 is not read as a label, since its polarity would be a guess: write true or false"
            if isinstance(value, (int, float)) else "; write true or false")
    raise DataError(file, num, "label", f"expected a boolean (true: desirable, false: undesirable), got "
                    f"{type(value).__name__} {value!r:.60}{hint}")


def _prompt(row: dict[str, Any], file: str, num: int) -> Messages:
    value = row.get("prompt")
    if value is None:
        raise DataError(file, num, "prompt", "missing field")
    if isinstance(value, str):
        if not value.strip():
            raise DataError(file, num, "prompt", "is empty")
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value:
        return plain_messages(value, file, num, "prompt")
    if isinstance(value, list):
        raise DataError(file, num, "prompt", "is empty")
    raise DataError(file, num, "prompt", f"expected text or a list of messages, got {type(value).__name__}")


def row_to_unpaired(row: dict[str, Any], file: str, num: int,
                    system_prompt: str | None = None) -> tuple[Messages, Messages, bool]:
    """(prompt, completion, label) of one row, validated; raises DataError naming the field."""
    prompt = _prompt(row, file, num)
    if row.get("completion") is None:
        raise DataError(file, num, "completion", "missing field")
    try:
        completion = response_messages(row["completion"], file, num, "completion")
    except BadPair as exc:  # an empty completion: a plain error here, as there is no pair to drop
        raise DataError(file, num, exc.field, "is empty: there is nothing to score") from None
    label = parse_label(row.get("label"), file, num)
    if system_prompt and (not isinstance(prompt[0], dict) or prompt[0].get("role") != "system"):
        prompt = [{"role": "system", "content": system_prompt}, *prompt]
    full = validate_messages(prompt + completion, file, num, "prompt+completion")
    prompt, completion = full[:len(prompt)], full[len(prompt):]
    if not prompt[-1]["content"].strip():
        raise DataError(file, num, f"prompt[{len(prompt) - 1}].content", "the prompt (last user turn) is empty")
    return prompt, completion, label


def suggested_weights(n_desirable: int, n_undesirable: int) -> tuple[float, float]:
    """(desirable_weight, undesirable_weight), i.e. (lambda_D, lambda_U), for a data set with these class counts.

    Ethayarajh et al. 2024 (sec. 4.1) advise lambda_D n_D / (lambda_U n_U) in [1, 4/3], so the desirable side weighs
    as much as the undesirable side, or a little more; e.g. for 1 desirable row to 10 undesirable, lambda_U = 1 and
    lambda_D in [10, 13.33]. As there, lambda_U stays 1 and lambda_D is the value in
    [n_U / n_D, 4/3 * n_U / n_D] nearest to 1 (so a set already in range keeps (1, 1)): 70 desirable to 50
    undesirable gives lambda_D = 4/3 * 50/70 = 0.952, 50 to 70 gives 70/50 = 1.4. With only one class there is no
    ratio to set and the weights stay (1, 1)."""
    if n_desirable < 0 or n_undesirable < 0 or n_desirable + n_undesirable == 0:
        raise ValueError(f"class counts must be >= 0 and not both 0, got {n_desirable} desirable and "
                         f"{n_undesirable} undesirable")
    if n_desirable == 0 or n_undesirable == 0:
        return 1.0, 1.0
    low, high = (bound * n_undesirable / n_desirable for bound in WEIGHT_RATIO_RANGE)
    return min(max(1.0, low), high), 1.0


def balance_line(file: str, rows: int, desirable: int, undesirable: int) -> str:
    """``"f.jsonl: 120 rows: 70 desirable, 50 undesirable (58%/42%)"``: the class balance in one line."""
    total = desirable + undesirable
    shares = f" ({desirable / total:.0%}/{undesirable / total:.0%})" if total else ""
    return f"{file}: {rows} rows: {desirable} desirable, {undesirable} undesirable{shares}"


def imbalance_note(desirable: int, undesirable: int) -> str | None:
    """A note when one class is under ``MINORITY_SHARE`` of the rows, with the weights ``suggested_weights`` gives;
    None when both classes are well represented."""
    total = desirable + undesirable
    if not total:
        return None
    small, name = min((desirable, "desirable"), (undesirable, "undesirable"))
    if small / total >= MINORITY_SHARE:
        return None
    d_w, u_w = suggested_weights(desirable, undesirable)
    return (f"only {small / total:.1%} of the rows are {name}: KTO's class weights then decide how much that class "
            f"counts; the paper's lambda_D*n_D/(lambda_U*n_U) in [1, 4/3] gives desirable_weight={d_w:.3g}, "
            f"undesirable_weight={u_w:.3g}")


@dataclass
class UnpairedReport:
    file: str
    rows: int = 0
    desirable: int = 0  # kept rows labelled true
    undesirable: int = 0  # kept rows labelled false
    truncated: list[int] = field(default_factory=list)
    dropped_overlong: list[int] = field(default_factory=list)
    tokens: int = 0

    @property
    def kept(self) -> int:
        return self.desirable + self.undesirable

    @property
    def imbalance(self) -> str | None:
        return imbalance_note(self.desirable, self.undesirable)

    def summary(self) -> str:
        parts = [balance_line(self.file, self.rows, self.desirable, self.undesirable) + f", {self.tokens} tokens"]
        if self.truncated:
            parts.append(f"{len(self.truncated)} truncated")
        if self.dropped_overlong:
            parts.append(f"{len(self.dropped_overlong)} dropped as over-long")
        if self.imbalance:
            parts.append(self.imbalance)
        return "; ".join(parts)


def build_unpaired(path: str, tokenizer, *, max_seq_len: int, overlong: str = "error",
                   system_prompt: str | None = None, chat_template: str | None = None,
                   limit: int | None = None) -> tuple[list[Unpaired], UnpairedReport]:
    """Validate every row first (so a bad row stops the run before any tokenising), then render them.

    ``overlong``: ``error`` stops at a row longer than ``max_seq_len``; ``drop`` skips it, ``truncate`` cuts the
    end of its completion; both are counted in the report, by row."""
    if overlong not in ("error", "drop", "truncate"):
        raise ValueError(f"overlong must be 'error', 'drop' or 'truncate', got {overlong!r}")
    rows = read_rows(path)[:limit] if limit else read_rows(path)
    report = UnpairedReport(file=path, rows=len(rows))
    parsed = [(num, *row_to_unpaired(row, path, num, system_prompt)) for num, row in rows]
    out: list[Unpaired] = []
    for num, prompt, completion, label in parsed:
        try:
            ex = render_response(tokenizer, prompt, completion, chat_template)
        except TemplateError as exc:
            raise DataError(path, num, None, str(exc)) from None
        if len(ex) > max_seq_len:
            if overlong == "error":
                raise DataError(path, num, None, f"{len(ex)} tokens, more than data.max_seq_len={max_seq_len}; "
                                "raise it or set data.overlong to 'truncate' or 'drop'")
            if overlong == "drop":
                report.dropped_overlong.append(num)
                continue
            ex.input_ids, ex.trained = ex.input_ids[:max_seq_len], ex.trained[:max_seq_len]
            if not ex.num_trained:
                raise DataError(path, num, None, f"the prompt alone fills data.max_seq_len={max_seq_len}")
            report.truncated.append(num)
        ex.row, ex.source = num, path
        out.append(Unpaired(ex, prompt, label, num, path, index=len(out)))
        report.tokens += len(ex)
        if label:
            report.desirable += 1
        else:
            report.undesirable += 1
    if not out:
        raise DataError(path, None, None, "no row is left to train on (see data.overlong)")
    return out, report
