"""A row as one normalised text (lowercase words, no punctuation), and its word n-grams: what every curation
check compares, so no tokenizer is needed and the numbers are the same on every machine.

Layer 6 (curate): may import posttrain.data, models, errors and io; never config.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Sequence

from posttrain.data.formats import detect_format, row_to_messages
from posttrain.data.pairs import row_to_pair
from posttrain.errors import BadPair, ConfigError, DataError

# Fields read, in this order, from a row that is neither a chat/SFT row nor a preference pair: plain corpora
# ("text"), eval prompt sets ("prompt") and question/answer sets such as GSM8K ("question", "answer").
PLAIN_FIELDS = ("text", "prompt", "question", "answer")

_PUNCT = re.compile(r"[^\w\s]+")


def normalize(text: str) -> str:
    """Lowercase, punctuation to spaces, whitespace collapsed: 'Hello,  World!' -> 'hello world'."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def message_contents(messages: list[dict[str, str]]) -> list[str]:
    # System prompts are left out: one shared system prompt on every row would make unrelated rows look alike
    # (false near-duplicates) and eval rows look leaked.
    return [m["content"] for m in messages if m.get("role") != "system"]


_HH_MARK = re.compile(r"(?:^|\n\n)(?:Human|Assistant):")


def _loose_pair_text(row: dict[str, Any]) -> str:
    """Text of a well-formed pair that cannot teach a preference (an empty or identical response, ...).

    Such rows still have text worth deduplicating or checking for leaks, so they are compared, not refused. An HH
    row's two dialogues share their prompt: it is taken once (the common prefix), as for a valid pair.
    """
    if row.get("prompt") is None and isinstance(row["chosen"], str) and isinstance(row["rejected"], str):
        common = len(os.path.commonprefix([row["chosen"], row["rejected"]]))
        return _HH_MARK.sub("\n", row["chosen"] + "\n" + row["rejected"][common:])
    parts = []
    for fld in ("prompt", "chosen", "rejected"):
        value = row.get(fld)
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, list):
            parts += [m["content"] for m in value if isinstance(m, dict) and isinstance(m.get("content"), str)
                      and m.get("role") != "system"]
    return "\n".join(parts)


def raw_text(row: dict[str, Any], path: str | Path, num: int) -> str:
    """The row's content as one text, before normalising; a row no format explains is a DataError."""
    file = str(path)
    if "chosen" in row and "rejected" in row:
        try:
            prompt, chosen, rejected = row_to_pair(row, file, num)
        except BadPair:
            return _loose_pair_text(row)
        return "\n".join(message_contents(prompt + chosen + rejected))
    if detect_format(row):
        return "\n".join(message_contents(row_to_messages(row, "auto", file, num)))
    parts = []
    for fld in PLAIN_FIELDS:
        if row.get(fld) is None:
            continue
        if not isinstance(row[fld], str):
            raise DataError(file, num, fld, f"expected a string, got {type(row[fld]).__name__}")
        parts.append(row[fld])
    if not parts:
        raise DataError(file, num, None, "no text to compare: expected 'messages', 'instruction'+'output', "
                        "'prompt'+'completion', 'chosen'+'rejected' or one of "
                        f"{', '.join(repr(f) for f in PLAIN_FIELDS)}; got fields {sorted(row)}")
    if not "".join(parts).strip():
        raise DataError(file, num, next(f for f in PLAIN_FIELDS if row.get(f) is not None), "is empty")
    return "\n".join(parts)


def row_text(row: dict[str, Any], path: str | Path, num: int) -> str:
    """The row's text for comparison: message contents of an SFT row (system prompts left out), prompt + chosen +
    rejected of a pair, or its plain text fields; normalised (lowercase, no punctuation, single spaces)."""
    return normalize(raw_text(row, path, num))


def ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """Word n-grams in order; a text shorter than n is one gram (the whole text), an empty text has none."""
    if not words:
        return []
    if len(words) < n:
        return [tuple(words)]
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def check_fraction(name: str, value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"{name} must be in (0, 1], got {value}")
