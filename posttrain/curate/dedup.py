"""Dedup of a data file: exact copies (blake2b of the normalised text) and MinHash/LSH near duplicates.

Layer 6 (curate): may import posttrain.data, models, errors and io; never config.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from posttrain.curate.minhash import band_rows_for, estimate_jaccard, jaccard, minhash
from posttrain.curate.text import check_fraction, ngrams, row_text
from posttrain.data.readers import Row, read_rows
from posttrain.errors import ConfigError, DataError
from posttrain.io import atomic_write_text


@dataclass
class Removed:
    row: int
    duplicate_of: int
    kind: str  # "exact" or "near"
    similarity: float  # true Jaccard of the shingle sets (1.0 for exact)
    estimate: float  # MinHash estimate (1.0 for exact)


@dataclass
class DedupReport:
    file: str
    rows: int
    kept: int
    threshold: float
    shingle: int
    removed: list[Removed] = field(default_factory=list)

    @property
    def exact(self) -> int:
        return sum(r.kind == "exact" for r in self.removed)

    @property
    def near(self) -> int:
        return sum(r.kind == "near" for r in self.removed)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "exact": self.exact, "near": self.near}


def dedup_rows(rows: list[Row], path: str | Path, *, threshold: float = 0.8, shingle: int = 5,
               num_perm: int = 128, seed: int = 0) -> tuple[list[Row], DedupReport]:
    """Keep the first occurrence of every text; drop exact copies and near copies (Jaccard >= threshold of word
    ``shingle``-gram sets) of a row already kept. Every dropped row is reported with the row it duplicates.

    LSH banding finds candidates without comparing all pairs, with bands chosen so that a pair at the threshold is
    missed with probability under 1e-4 (``band_rows_for``). A candidate is then decided by the true Jaccard of the
    shingle sets, so no row is dropped on an estimate alone.
    """
    check_fraction("threshold", threshold)
    if shingle < 1 or num_perm < 1:
        raise ConfigError(f"need shingle >= 1 and num_perm >= 1, got shingle={shingle}, num_perm={num_perm}")
    band_rows = band_rows_for(threshold, num_perm)
    report = DedupReport(file=str(path), rows=len(rows), kept=0, threshold=threshold, shingle=shingle)
    kept: list[Row] = []
    first_exact: dict[bytes, int] = {}  # text digest -> row number kept
    shingles: dict[int, set] = {}  # kept row number -> its shingle set
    sigs: dict[int, np.ndarray] = {}
    buckets: dict[tuple[int, bytes], list[int]] = defaultdict(list)
    # The estimate only skips hopeless candidates; 0.15 below the threshold is > 3 standard deviations of a
    # 128-permutation estimate (sd <= sqrt(0.25 / 128) = 0.044), so a true duplicate is not skipped.
    prefilter = threshold - 0.15
    for num, row in rows:
        text = row_text(row, path, num)
        digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
        if digest in first_exact:
            report.removed.append(Removed(num, first_exact[digest], "exact", 1.0, 1.0))
            continue
        sh = set(ngrams(text.split(), shingle))
        sig = minhash(sh, num_perm, seed)
        keys = [(b, sig[b * band_rows:(b + 1) * band_rows].tobytes()) for b in range(num_perm // band_rows)]
        best: tuple[float, float, int] | None = None  # (true Jaccard, estimate, row)
        for cand in sorted({c for k in keys for c in buckets.get(k, ())}):
            est = estimate_jaccard(sig, sigs[cand])
            if est < prefilter:
                continue
            true = jaccard(sh, shingles[cand])
            if true >= threshold and (best is None or true > best[0]):
                best = (true, est, cand)
        if best is not None:
            report.removed.append(Removed(num, best[2], "near", round(best[0], 4), round(best[1], 4)))
            continue
        first_exact[digest] = num
        shingles[num], sigs[num] = sh, sig
        for k in keys:
            buckets[k].append(num)
        kept.append((num, row))
    report.kept = len(kept)
    return kept, report


def write_jsonl(path: str | Path, rows: list[Row], source: str | Path) -> None:
    """The rows' JSON objects, one a line, written atomically (temporary name, then rename)."""

    lines = []
    for num, row in rows:
        try:
            lines.append(json.dumps(row, ensure_ascii=False) + "\n")
        except (TypeError, ValueError) as exc:
            raise DataError(source, num, None, f"cannot be written as JSON: {exc}") from None
    atomic_write_text(Path(path), "".join(lines))


def dedup_file(path: str | Path, out: str | Path, *, threshold: float = 0.8, shingle: int = 5,
               report_path: str | Path | None = None) -> DedupReport:
    """Dedup a data file into ``out`` (JSONL, kept rows unchanged and in order) and write the report as JSON."""
    if Path(out).resolve() == Path(path).resolve():
        raise ConfigError(f"--out {out} is the input file; write the deduplicated rows to a new file")
    rows = read_rows(path)
    kept, report = dedup_rows(rows, path, threshold=threshold, shingle=shingle)
    write_jsonl(out, kept, path)
    if report_path is not None:

        atomic_write_text(Path(report_path), json.dumps(report.to_dict(), indent=2) + "\n")
    return report
