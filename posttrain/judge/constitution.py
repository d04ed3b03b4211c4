"""A constitution: the principles Constitutional AI critiques, revises and judges against (Bai et al., 2022)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from posttrain.errors import DataError

DEFAULT_CONSTITUTION = Path(__file__).with_name("constitution.yaml")


@dataclass(frozen=True)
class Principle:
    """One principle. ``critique`` and ``revision`` are requests put to the model after its answer (SL-CAI);
    ``criterion`` is what a judge compares two answers on (RL-CAI)."""
    name: str
    critique: str
    revision: str
    criterion: str


FIELDS = tuple(f.name for f in fields(Principle))


def load_constitution(path: str | Path | None = None) -> list[Principle]:
    """The principles of a YAML file: a list of principles, or ``{principles: [...]}``; None = the shipped default.

    Errors are DataErrors naming the file and the field as ``principles[i].field`` (0-based, like ``messages[i]``).
    """
    import yaml

    path = Path(path) if path is not None else DEFAULT_CONSTITUTION
    if not path.is_file():
        raise DataError(path, None, None, "file does not exist" if not path.exists() else "not a regular file")
    try:
        data: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise DataError(path, None, None, f"invalid YAML: {exc}") from None
    if isinstance(data, dict):
        if set(data) != {"principles"}:
            raise DataError(path, None, None, f"expected a list of principles or {{principles: [...]}}, "
                                              f"got the keys {sorted(map(str, data))}")
        data = data["principles"]
    if not isinstance(data, list) or not data:
        raise DataError(path, None, "principles", "expected a non-empty list of principles, each with "
                                                  f"{', '.join(FIELDS)}")
    principles: list[Principle] = []
    for i, item in enumerate(data):
        where = f"principles[{i}]"
        if not isinstance(item, dict):
            raise DataError(path, None, where, f"expected a mapping with {', '.join(FIELDS)}, "
                                               f"got {type(item).__name__}")
        unknown = sorted(set(map(str, item)) - set(FIELDS))
        if unknown:  # a misspelt key would otherwise surface as a confusing "missing field"
            raise DataError(path, None, f"{where}.{unknown[0]}", f"unknown field; a principle has {', '.join(FIELDS)}")
        for name in FIELDS:
            value = item.get(name)
            if value is None:
                raise DataError(path, None, f"{where}.{name}", "missing field")
            if not isinstance(value, str) or not value.strip():
                raise DataError(path, None, f"{where}.{name}", f"expected non-empty text, got {value!r}")
        principle = Principle(**{name: item[name].strip() for name in FIELDS})
        if any(p.name == principle.name for p in principles):
            raise DataError(path, None, f"{where}.name", f"duplicate principle name {principle.name!r}")
        principles.append(principle)
    return principles
