"""Read rows from JSONL, JSON, Parquet or CSV, keeping each row's number for error messages."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """Bad input data. The message names the file, the row (1-based) and the field."""

    def __init__(self, file: str | Path, row: int | None, field: str | None, problem: str):
        self.file, self.row, self.field, self.problem = str(file), row, field, problem
        where = str(file)
        if row is not None:
            where += f", row {row}"
        if field is not None:
            where += f", field {field!r}"
        super().__init__(f"{where}: {problem}")


Row = tuple[int, dict[str, Any]]  # (1-based row number, the row)

_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def read_rows(path: str | Path) -> list[Row]:
    """All rows of a data file as ``(row_number, dict)``; any unreadable row stops with a DataError."""
    path = Path(path)
    kind = path.suffixes[-2] if path.suffix == ".gz" and len(path.suffixes) > 1 else path.suffix
    if kind not in _SUFFIXES:
        raise DataError(path, None, None, f"unknown file type {kind or '(none)'!r}; expected one of {', '.join(_SUFFIXES)}")
    if not path.is_file():
        raise DataError(path, None, None, "file does not exist" if not path.exists() else "not a regular file")
    try:
        if kind == ".jsonl":
            rows = _read_jsonl(path)
        elif kind == ".json":
            rows = _read_json(path)
        elif kind == ".csv":
            with _open_text(path) as f:
                # Row 1 is the header, so data rows are numbered as a spreadsheet shows them.
                rows = [(i, dict(r)) for i, r in enumerate(csv.DictReader(f), start=2)]
        else:
            import pyarrow.parquet as pq

            rows = [(i, r) for i, r in enumerate(pq.read_table(path).to_pylist(), start=1)]
    except DataError:
        raise
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as exc:
        raise DataError(path, None, None, f"cannot read file: {exc}") from None
    for num, row in rows:
        if not isinstance(row, dict):
            raise DataError(path, num, None, f"expected an object with fields, got {type(row).__name__}")
    if not rows:
        raise DataError(path, None, None, "file has no rows")
    return rows


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    with _open_text(path) as f:
        for num, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append((num, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(path, num, None, f"invalid JSON: {exc.msg} at column {exc.colno}") from None
    return rows


def _read_json(path: Path) -> list[Row]:
    with _open_text(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise DataError(path, None, None, f"invalid JSON: {exc.msg} at line {exc.lineno}") from None
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(path, None, None, "a JSON file must hold a list of rows (or an object with one list field)")
        data = data[lists[0]]
    if not isinstance(data, list):
        raise DataError(path, None, None, f"a JSON file must hold a list of rows, got {type(data).__name__}")
    return list(enumerate(data, start=1))
