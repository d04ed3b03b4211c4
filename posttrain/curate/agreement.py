"""Inter-rater agreement: Cohen's kappa of raters' labels, pairwise, with the Landis & Koch reading.

Layer 6 (curate): may import posttrain.data, models, errors and io; never config.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Hashable, Sequence

from posttrain.curate.audit import get_field
from posttrain.data.readers import read_rows
from posttrain.errors import ConfigError, DataError

# Landis & Koch (1977): upper bound of each band (inclusive) and its word; negative kappa is "poor".
LANDIS_KOCH = ((0.0, "poor"), (0.20, "slight"), (0.40, "fair"), (0.60, "moderate"), (0.80, "substantial"),
               (1.0, "almost perfect"))


def landis_koch(kappa: float) -> str:
    """0.0-0.20 slight, 0.21-0.40 fair, 0.41-0.60 moderate, 0.61-0.80 substantial, 0.81-1 almost perfect."""
    if kappa < 0:
        return "poor"
    return next((word for upper, word in LANDIS_KOCH[1:] if kappa <= upper), "almost perfect")


@dataclass
class Kappa:
    raters: tuple[str, str]
    n: int  # items both raters labelled
    skipped: int  # rows where either label is missing
    p_o: float | None
    p_e: float | None
    kappa: float | None
    interpretation: str
    note: str = ""


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable], raters: tuple[str, str] = ("a", "b"),
                skipped: int = 0) -> Kappa:
    """Cohen's kappa = (p_o - p_e) / (1 - p_e); p_o the observed agreement, p_e = sum over labels of the product
    of the two raters' label shares (chance agreement). Computed in fractions, so a kappa on a band boundary
    (0.4 exactly) lands in the band the table says, not just below it."""
    if len(a) != len(b):
        raise ValueError("both raters need a label for each item")
    n = len(a)
    if n == 0:
        return Kappa(raters, 0, skipped, None, None, None, "n/a", "no item was labelled by both raters")
    p_o = Fraction(sum(x == y for x, y in zip(a, b)), n)
    ca, cb = Counter(a), Counter(b)
    p_e = Fraction(sum(ca[k] * cb[k] for k in ca), n * n)
    note = ""
    if p_e == 1:
        # Both raters gave one and the same label to every item: kappa is 0/0. Full agreement counts as 1.
        kappa = Fraction(1) if p_o == 1 else Fraction(0)
        note = "p_e = 1 (every item has the same label): kappa is undefined, reported as " + str(int(kappa))
    else:
        kappa = (p_o - p_e) / (1 - p_e)
    return Kappa(raters, n, skipped, float(p_o), float(p_e), float(kappa), landis_koch(float(kappa)), note)


@dataclass
class AgreementReport:
    file: str
    raters: list[str]
    rows: int
    pairs: list[Kappa]
    matrix: list[list[float | None]]  # kappa of rater i with rater j; 1 on the diagonal
    mean_kappa: float | None
    interpretation: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _label(row: dict[str, Any], name: str, path: str | Path, num: int) -> Hashable | None:
    found, value = get_field(row, name)
    if not found:
        return None
    if isinstance(value, (list, dict)):
        raise DataError(path, num, name, f"expected a label (text, number or true/false), got {type(value).__name__}")
    return value


def agreement(path: str | Path, raters: Sequence[str]) -> AgreementReport:
    """Pairwise Cohen's kappa of the labels in the ``raters`` fields (a k x k matrix and the mean over pairs); a
    row where either rater of a pair has no label is skipped for that pair and counted."""
    raters = list(raters)
    if len(raters) < 2 or len(set(raters)) != len(raters):
        raise ConfigError(f"need at least two different rater fields, got {raters}")
    rows = read_rows(path)
    labels = {r: [_label(row, r, path, num) for num, row in rows] for r in raters}
    for r in raters:
        if all(v is None for v in labels[r]):
            raise DataError(path, None, r, "no row has a label in this rater field")
    k = len(raters)
    matrix: list[list[float | None]] = [[1.0 if i == j else None for j in range(k)] for i in range(k)]
    pairs = []
    for i in range(k):
        for j in range(i + 1, k):
            both = [(x, y) for x, y in zip(labels[raters[i]], labels[raters[j]]) if x is not None and y is not None]
            kp = cohen_kappa([x for x, _ in both], [y for _, y in both], (raters[i], raters[j]),
                             skipped=len(rows) - len(both))
            pairs.append(kp)
            matrix[i][j] = matrix[j][i] = kp.kappa
    defined = [p.kappa for p in pairs if p.kappa is not None]
    mean = sum(defined) / len(defined) if defined else None
    return AgreementReport(str(path), raters, len(rows), pairs, matrix, mean,
                           landis_koch(mean) if mean is not None else "n/a")
