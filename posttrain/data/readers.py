"""Read rows from JSONL, JSON, Parquet or CSV (optionally gzipped), keeping each row's number for error messages."""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import re
import zlib
from pathlib import Path
from typing import Any

from posttrain.errors import DataError

Row = tuple[int, dict[str, Any]]  # (1-based row number, the row)

_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
# What the surrogateescape error handler turns undecodable bytes into; used only to find which row holds one.
_UNDECODED = re.compile("[\udc80-\udcff]")


def read_rows(path: str | Path) -> list[Row]:
    """All rows of a data file as ``(row_number, dict)``; any unreadable row stops with a DataError.

    Row numbers are line numbers for JSONL, list positions for JSON and spreadsheet rows for CSV (the header is
    row 1). Text files are UTF-8, with or without a byte-order mark (as Excel and Notepad write them).
    """
    path = Path(path)
    kind = path.suffixes[-2] if path.suffix == ".gz" and len(path.suffixes) > 1 else path.suffix
    if kind not in _SUFFIXES:
        raise DataError(path, None, None,
                        f"unknown file type {kind or '(none)'!r}; expected one of {', '.join(_SUFFIXES)}")
    if not path.is_file():
        raise DataError(path, None, None, "file does not exist" if not path.exists() else "not a regular file")
    try:
        if kind == ".parquet":
            import pyarrow.parquet as pq

            rows = [(i, r) for i, r in enumerate(pq.read_table(path).to_pylist(), start=1)]
        else:
            text = _decode(path, kind)
            rows = {".jsonl": _parse_jsonl, ".json": _parse_json, ".csv": _parse_csv}[kind](path, text)
    except DataError:
        raise
    except (OSError, EOFError, zlib.error, ValueError) as exc:  # EOFError, zlib.error: a truncated or corrupt .gz
        raise DataError(path, None, None, f"cannot read file: {exc}") from None
    for num, row in rows:
        if not isinstance(row, dict):
            raise DataError(path, num, None, f"expected an object with fields, got {type(row).__name__}")
    if not rows:
        raise DataError(path, None, None, "file has no rows")
    return rows


def _decode(path: Path, kind: str) -> str:
    raw = path.read_bytes()
    gz = path.suffix == ".gz"
    if gz:
        raw = gzip.decompress(raw)
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DataError(path, None, None, "the file is UTF-16 (it starts with a UTF-16 byte-order mark); "
                        "save it as UTF-8")
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = bom + exc.start
        line = raw.count(b"\n", 0, offset) + 1
        row, field = _locate_undecodable(kind, raw[bom:].decode("utf-8", "surrogateescape"), line)
        of = "of the decompressed data" if gz else "of the file"
        at_line = f" (line {line})" if row != line else ""
        raise DataError(path, row, field, f"not valid UTF-8: byte 0x{raw[offset]:02x} at byte offset {offset} {of}"
                        f"{at_line}; save the file as UTF-8 (it may be Latin-1 or Windows-1252)") from None


def _locate_undecodable(kind: str, text: str, line: int) -> tuple[int | None, str | None]:
    """(row, field) holding the first undecodable byte, as well as the format lets us tell; None where it cannot."""
    row: int | None = None
    value: Any = None
    try:
        if kind == ".jsonl":
            row = line
            value = json.loads(list(io.StringIO(text, newline=None))[line - 1])
        elif kind == ".csv":
            records = csv.reader(io.StringIO(text, newline=""))
            header = next(records)
            if _UNDECODED.search("".join(header)):
                return 1, None
            for num, record in enumerate(records, start=2):
                col = next((j for j, v in enumerate(record) if _UNDECODED.search(v)), None)
                if col is not None:
                    return num, _printable(header[col]) if col < len(header) else None
            return None, None
        else:
            data = _unwrap(json.loads(text))
            for num, item in enumerate(data or [], start=1):
                if _tainted(item) is not None:
                    row, value = num, item
                    break
    except (ValueError, IndexError, StopIteration, csv.Error):
        return row, None
    field = _tainted(value)
    return row, _printable(field) if field else None


def _tainted(value: Any, path: str = "") -> str | None:
    """The field path of the first string (or key) in ``value`` holding an undecodable byte, else None."""
    if isinstance(value, str):
        return path if _UNDECODED.search(value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        sub = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else str(key)
        if isinstance(key, str) and _UNDECODED.search(key):
            return sub
        if (found := _tainted(item, sub)) is not None:
            return found
    return None


def _printable(text: str) -> str:
    # A lone surrogate cannot be printed to a UTF-8 terminal; show the raw byte as \xNN instead.
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _json_problem(exc: json.JSONDecodeError, with_line: bool) -> str:
    # Some of json's messages end in " at" because json appends the position itself ("... at line 1 column 5").
    msg = exc.msg.removesuffix(" at")
    where = f"line {exc.lineno}, column {exc.colno}" if with_line else f"column {exc.colno}"
    hint = ""
    if msg.startswith("Invalid control character") and exc.pos < len(exc.doc):
        msg += f" {exc.doc[exc.pos]!r}"
        hint = " (inside a string, write a tab or newline as \\t or \\n)"
    return f"invalid JSON: {msg} at {where}{hint}"


def _parse_jsonl(path: Path, text: str) -> list[Row]:
    rows = []
    # Universal newlines, as reading the file in text mode would: \n, \r\n or \r, but not \u2028 and the other
    # separators str.splitlines knows, which JSON strings may hold unescaped.
    for num, line in enumerate(io.StringIO(text, newline=None), start=1):
        if not line.strip():
            continue
        try:
            # Without its line ending, so an unclosed string reads as such, not as a raw newline inside it.
            rows.append((num, json.loads(line.rstrip("\r\n"))))
        except json.JSONDecodeError as exc:
            raise DataError(path, num, None, _json_problem(exc, with_line=False)) from None
    return rows


def _unwrap(data: Any) -> list | None:
    """The rows of a JSON document: the list itself, or the only list field of an object."""
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        return lists[0] if len(lists) == 1 else None
    return data if isinstance(data, list) else None


def _parse_json(path: Path, text: str) -> list[Row]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(path, None, None, _json_problem(exc, with_line=True)) from None
    rows = _unwrap(data)
    if rows is None:
        if isinstance(data, dict):
            raise DataError(path, None, None, "a JSON file must hold a list of rows (or an object with one list field)")
        raise DataError(path, None, None, f"a JSON file must hold a list of rows, got {type(data).__name__}")
    return list(enumerate(rows, start=1))


def _parse_csv(path: Path, text: str) -> list[Row]:
    """Rows under the header, numbered as a spreadsheet shows them. A row with more or fewer fields than the
    header is refused: csv.DictReader would drop the extra values or fill the gaps with None, silently."""
    records = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(records)
    except StopIteration:
        return []
    except csv.Error as exc:
        raise DataError(path, 1, None, f"invalid CSV: {exc}") from None
    if dup := sorted({h for h in header if header.count(h) > 1}):
        raise DataError(path, 1, dup[0], "the header names this column twice; one of the two would be lost")
    rows: list[Row] = []
    num = 1
    while True:
        num += 1
        try:
            record = next(records)
        except StopIteration:
            return rows
        except csv.Error as exc:
            raise DataError(path, num, None, f"invalid CSV: {exc}") from None
        if not record:  # a blank line
            continue
        if len(record) > len(header):
            extra = ", ".join(repr(v) for v in record[len(header):])
            raise DataError(path, num, None, f"{_fields(len(record))} but the header has {len(header)} "
                            f"({', '.join(header)}): no column for {extra}; quote a value that holds a comma")
        if len(record) < len(header):
            missing = header[len(record):]
            raise DataError(path, num, missing[0], f"{_fields(len(record))} but the header has {len(header)}: "
                            f"no value for {', '.join(map(repr, missing))}")
        rows.append((num, dict(zip(header, record))))


def _fields(n: int) -> str:
    return f"{n} field" if n == 1 else f"{n} fields"
