"""The make-up of a data file: rows per value of a field (stratification audit) and the length bias of
preference pairs.

Layer 6 (curate): may import posttrain.data, models, errors and io; never config.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from posttrain.curate.text import message_contents
from posttrain.data.pairs import row_to_pair
from posttrain.data.readers import read_rows
from posttrain.errors import BadPair, ConfigError, DataError

# ---------------------------------------------------------------------------------------------------------------
# Stratification audit

MISSING = "(missing)"


def get_field(row: dict[str, Any], name: str) -> tuple[bool, Any]:
    """(found, value) of a field; ``meta.source`` walks nested objects. A null value counts as missing."""
    if name in row:
        return row[name] is not None, row[name]
    value: Any = row
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return value is not None, value


@dataclass
class Bin:
    value: Any
    count: int
    share: float


@dataclass
class AuditReport:
    file: str
    field: str
    rows: int
    min_share: float
    max_share: float
    bins: list[Bin]  # most rows first; rows without the field are the bin "(missing)"
    missing: int
    warnings: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def audit(path: str | Path, field_name: str, *, min_share: float = 0.05, max_share: float = 0.4) -> AuditReport:
    """Counts and shares of each value of ``field_name``; a warning for each bin under ``min_share`` or over
    ``max_share`` of all rows, and one for rows that lack the field (their own bin, "(missing)")."""
    if not 0.0 <= min_share < max_share <= 1.0:
        raise ConfigError(f"need 0 <= min-share < max-share <= 1, got {min_share} and {max_share}")
    rows = read_rows(path)
    counts: Counter[str] = Counter()
    values: dict[str, Any] = {}  # key -> first value seen
    missing = 0
    for num, row in rows:
        found, value = get_field(row, field_name)
        if not found:
            missing += 1
            continue
        # Keyed by JSON text so 1, "1" and true stay apart and lists or objects can be bins too.
        key = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
        values.setdefault(key, value)
        counts[key] += 1
    total = len(rows)
    if not counts:
        raise DataError(path, None, field_name, "no row has this field")
    bins = [Bin(values[k], c, round(c / total, 4)) for k, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    warnings = []
    for b in bins:
        if b.count / total < min_share:
            warnings.append(f"{field_name}={b.value!r} is {b.count / total:.1%} of rows, under {min_share:.0%}")
        elif b.count / total > max_share:
            warnings.append(f"{field_name}={b.value!r} is {b.count / total:.1%} of rows, over {max_share:.0%}")
    if missing:
        bins.append(Bin(MISSING, missing, round(missing / total, 4)))
        warnings.append(f"{missing} of {total} rows have no {field_name!r} ({missing / total:.1%})")
    return AuditReport(str(path), field_name, total, min_share, max_share, bins, missing, warnings)


# ---------------------------------------------------------------------------------------------------------------
# Length bias of preference pairs

UNITS = {"words": lambda text: len(text.split()), "chars": len}


@dataclass
class LengthBias:
    file: str
    unit: str
    pairs: int
    chosen_mean: float
    chosen_median: float
    rejected_mean: float
    rejected_median: float
    chosen_longer: float  # share of pairs
    chosen_shorter: float
    equal: float
    longer_wins_accuracy: float  # the "longer answer wins" rule, ties counted half
    verdict: str
    lengths: list[tuple[int, int, int]]  # (row, chosen length, rejected length)
    skipped: list[tuple[int, str]]  # (row, why) of pairs that teach no preference

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def length_bias(path: str | Path, unit: str = "words") -> LengthBias:
    """How far response length alone predicts the preference: the chosen and rejected response lengths, and
    the accuracy a reward model would get by scoring length (the better of "longer wins" and "shorter wins")."""
    if unit not in UNITS:
        raise ConfigError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
    measure = UNITS[unit]
    lengths = []
    skipped = []  # pairs training would refuse or drop (data.bad_pairs): they teach no preference, so not counted
    for num, row in read_rows(path):
        try:
            _, chosen, rejected = row_to_pair(row, str(path), num)
        except BadPair as exc:
            skipped.append((num, f"{exc.field}: {exc.problem}"))
            continue
        lengths.append((num, measure("\n".join(message_contents(chosen))),
                        measure("\n".join(message_contents(rejected)))))
    n = len(lengths)
    if not n:
        raise DataError(path, None, None, f"no usable pair: all {len(skipped)} rows are bad pairs ({skipped[0][1]})")
    longer = sum(c > r for _, c, r in lengths)
    shorter = sum(c < r for _, c, r in lengths)
    equal = n - longer - shorter
    accuracy = (longer + 0.5 * equal) / n
    rule, best = ("longer", accuracy) if accuracy >= 0.5 else ("shorter", 1 - accuracy)
    verdict = (f"a reward model can reach {best:.1%} by length alone (the {rule} answer wins; 50% is no bias)")
    cs, rs = [c for _, c, _ in lengths], [r for _, _, r in lengths]
    return LengthBias(str(path), unit, n, round(statistics.fmean(cs), 4), float(statistics.median(cs)),
                      round(statistics.fmean(rs), 4), float(statistics.median(rs)), round(longer / n, 4),
                      round(shorter / n, 4), round(equal / n, 4), round(accuracy, 4), verdict, lengths, skipped)
