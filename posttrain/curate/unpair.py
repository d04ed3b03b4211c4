"""Unpaired preference rows for KTO from a pair file: each pair gives its chosen response as a desirable row and its
rejected response as an undesirable one, after the same prompt.

Input is any format ``data.row_to_pair`` reads (prompt / chosen / rejected as text or messages, or HH-style full
dialogues). Output rows are ``{"prompt": chat messages, "completion": assistant messages, "label": bool,
"provenance": {"source", "row", "side"}}``, which ``data.build_unpaired`` (and TRL's KTO trainer) read.

A pair whose two responses are identical carries no preference, and as two rows it would say that one completion is
both desirable and undesirable: it is skipped and counted. Pairs that DPO's ``data.bad_pairs: drop`` would drop (an
empty response, no common prompt) are skipped and listed by row, so nothing leaves silently; a malformed row stops
with its file, row and field.

Layer 6 (curate): may import data, errors and io; never config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from posttrain.data.pairs import row_to_pair
from posttrain.data.readers import read_rows
from posttrain.errors import BadPair, DataError
from posttrain.io import atomic_write_text

_IDENTICAL = "identical to chosen"  # how row_to_pair words the problem of a pair with one response twice


def unpaired_rows(path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The unpaired rows of a pair file (chosen then rejected, pair by pair) and the counts ``unpair`` returns."""
    file = str(path)
    records: list[dict[str, Any]] = []
    identical: list[int] = []
    bad: list[tuple[int, str]] = []
    rows = read_rows(path)
    for num, row in rows:
        try:
            prompt, chosen, rejected = row_to_pair(row, file, num)
        except BadPair as exc:
            if exc.problem.startswith(_IDENTICAL):
                identical.append(num)
            else:
                bad.append((num, f"{exc.field}: {exc.problem}" if exc.field else exc.problem))
            continue
        for side, response, label in (("chosen", chosen, True), ("rejected", rejected, False)):
            records.append({"prompt": prompt, "completion": response, "label": label,
                            "provenance": {"source": file, "row": num, "side": side}})
    counts = {"in": file, "pairs": len(rows), "rows": len(records), "desirable": len(records) // 2,
              "undesirable": len(records) // 2, "identical": len(identical), "identical_rows": identical,
              "bad": len(bad), "bad_rows": [{"row": n, "problem": why} for n, why in bad]}
    return records, counts


def unpair(in_path: str | Path, out_path: str | Path) -> dict[str, Any]:
    """Read the pair file (every row is checked before anything is written), write its unpaired rows to
    ``out_path`` atomically, and return the counts: pairs read, rows written, desirable and undesirable rows,
    identical pairs skipped (and their rows), other bad pairs skipped (row and problem)."""
    out = Path(out_path)
    if out.suffix != ".jsonl":
        raise DataError(out, None, None, "the output is JSON lines: give it a .jsonl name")
    records, counts = unpaired_rows(in_path)
    if not records:
        raise DataError(in_path, None, None, f"no pair gives unpaired rows ({counts['identical']} identical, "
                        f"{counts['bad']} bad); nothing is written")
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return {**counts, "out": str(out)}
