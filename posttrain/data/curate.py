"""Data curation on words: dedup (exact and MinHash near-duplicates), train/eval contamination, a stratification
audit, inter-rater agreement (Cohen's kappa) and the length bias of preference pairs.

Everything works on the normalised words of a row (see ``row_text``), so no tokenizer is needed and the numbers are
the same on every machine. Hashes are blake2b, never Python's ``hash()``, which is salted per process.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import statistics
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Any, Hashable, Sequence

import numpy as np

from posttrain.data.formats import detect_format, row_to_messages
from posttrain.data.preference import row_to_pair
from posttrain.data.readers import Row, read_rows
from posttrain.errors import BadPair, ConfigError, DataError

# ---------------------------------------------------------------------------------------------------------------
# Row -> normalised text

# Fields read, in this order, from a row that is neither a chat/SFT row nor a preference pair: plain corpora
# ("text"), eval prompt sets ("prompt") and question/answer sets such as GSM8K ("question", "answer").
PLAIN_FIELDS = ("text", "prompt", "question", "answer")

_PUNCT = re.compile(r"[^\w\s]+")


def normalize(text: str) -> str:
    """Lowercase, punctuation to spaces, whitespace collapsed: 'Hello,  World!' -> 'hello world'."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def _contents(messages: list[dict[str, str]]) -> list[str]:
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
        return "\n".join(_contents(prompt + chosen + rejected))
    if detect_format(row):
        return "\n".join(_contents(row_to_messages(row, "auto", file, num)))
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


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"{name} must be in (0, 1], got {value}")


# ---------------------------------------------------------------------------------------------------------------
# MinHash

# Universal hashing h(x) = (a*x + b) mod P with x, a, b < 2**32 and P = 2**32 + 15, the least prime above 2**32:
# a*x + b < 2**64, so the arithmetic is exact in uint64 and numpy does all permutations of all shingles at once,
# and a*x is many times P, so the reduction mixes (with a prime near 2**64 it would hardly wrap, and h would just
# follow the order of x).
_P = np.uint64((1 << 32) + 15)


def _shingle_hash(shingle: tuple[str, ...]) -> int:
    return int.from_bytes(hashlib.blake2b(" ".join(shingle).encode(), digest_size=4).digest(), "little")


@lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    # Derived from blake2b, not a RNG, so the same seed gives the same signatures on every machine and version.
    ab = [hashlib.blake2b(f"minhash:{seed}:{i}".encode(), digest_size=8).digest() for i in range(num_perm)]
    a = np.array([int.from_bytes(d[:4], "little") | 1 for d in ab], dtype=np.uint64)  # a != 0
    b = np.array([int.from_bytes(d[4:], "little") for d in ab], dtype=np.uint64)
    return a, b


def minhash(shingles: set[tuple[str, ...]], num_perm: int = 128, seed: int = 0) -> np.ndarray:
    """(num_perm,) uint64 signature: per hash function, the least hash over the shingles (all P for an empty set).
    The share of equal entries of two signatures estimates the Jaccard similarity of the sets."""
    a, b = _permutations(num_perm, seed)
    if not shingles:
        return np.full(num_perm, _P, dtype=np.uint64)
    x = np.array(sorted(_shingle_hash(s) for s in shingles), dtype=np.uint64)
    return ((x[:, None] * a[None, :] + b[None, :]) % _P).min(axis=0)


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    return float(np.mean(sig_a == sig_b))


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


# ---------------------------------------------------------------------------------------------------------------
# Dedup

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


def band_rows_for(threshold: float, num_perm: int) -> int:
    """Rows per LSH band: the most (fewest false candidates) for which a pair at the threshold still shares at
    least one of the ``num_perm / r`` bands with probability >= 0.9999, i.e. 1 - (1 - t**r)**(num_perm / r).
    128 permutations: 4 rows (32 bands) for t = 0.8, 2 rows for t = 0.5."""
    for r in (16, 8, 4, 2, 1):
        if num_perm % r == 0 and 1 - (1 - threshold ** r) ** (num_perm // r) >= 0.9999:
            return r
    return 1


def dedup_rows(rows: list[Row], path: str | Path, *, threshold: float = 0.8, shingle: int = 5,
               num_perm: int = 128, seed: int = 0) -> tuple[list[Row], DedupReport]:
    """Keep the first occurrence of every text; drop exact copies and near copies (Jaccard >= threshold of word
    ``shingle``-gram sets) of a row already kept. Every dropped row is reported with the row it duplicates.

    LSH banding finds candidates without comparing all pairs, with bands chosen so that a pair at the threshold is
    missed with probability under 1e-4 (``band_rows_for``). A candidate is then decided by the true Jaccard of the
    shingle sets, so no row is dropped on an estimate alone.
    """
    _check_fraction("threshold", threshold)
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
    from posttrain.io import atomic_write_text

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
        from posttrain.io import atomic_write_text

        atomic_write_text(Path(report_path), json.dumps(report.to_dict(), indent=2) + "\n")
    return report


# ---------------------------------------------------------------------------------------------------------------
# Train/eval contamination

@dataclass
class EvalLeak:
    row: int
    ngrams: int  # the eval row's n-grams (1 when it is shorter than n words)
    shared: int  # of those, found in the training file
    fraction: float
    longest_run: int  # words in the longest stretch of consecutive shared n-grams
    snippet: str  # that stretch (normalised text), cut to 120 characters
    train_rows: list[tuple[int, int]]  # up to 3 (train row, shared n-grams), most first
    contaminated: bool


@dataclass
class ContaminationReport:
    train: str
    eval: str
    n: int
    threshold: float
    train_rows: int
    rows: list[EvalLeak]

    @property
    def contaminated(self) -> list[EvalLeak]:
        return [r for r in self.rows if r.contaminated]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "contaminated": len(self.contaminated), "eval_rows": len(self.rows)}


def contamination(train_path: str | Path, eval_path: str | Path, *, n: int = 8,
                  threshold: float = 0.5) -> ContaminationReport:
    """For each eval row (prompt and answer), the share of its word n-grams found anywhere in the training file;
    contaminated when the share >= threshold. An eval text shorter than n words counts as found when all of it
    appears as a run of words in a training text.

    Only the eval rows' grams are indexed (eval sets are small), and training rows are streamed against them, so
    memory follows the eval set, not the training set.
    """
    _check_fraction("threshold", threshold)
    if n < 1:
        raise ConfigError(f"n must be >= 1, got {n}")
    eval_rows = read_rows(eval_path)
    train_rows = read_rows(train_path)
    eval_grams = []  # (row, words, grams)
    for num, row in eval_rows:
        words = row_text(row, eval_path, num).split()
        eval_grams.append((num, words, ngrams(words, n)))
    wanted = {g for _, _, grams in eval_grams for g in grams}
    lengths = {len(g) for g in wanted}  # n, plus the lengths of eval texts shorter than n
    where: dict[tuple[str, ...], set[int]] = defaultdict(set)  # eval gram -> training rows holding it
    for num, row in train_rows:
        words = row_text(row, train_path, num).split()
        for length in lengths:
            for i in range(len(words) - length + 1):
                g = tuple(words[i:i + length])
                if g in wanted:
                    where[g].add(num)
    out = []
    for num, words, grams in eval_grams:
        hits = [g in where for g in grams]
        best_len, best_end, run = 0, 0, 0
        for i, hit in enumerate(hits):
            run = run + 1 if hit else 0
            if run > best_len:
                best_len, best_end = run, i
        # A run of m consecutive shared grams of length L covers m + L - 1 words (they may come from different
        # training rows; the run says how much of the eval text is covered, not one copied passage).
        width = len(grams[0]) if grams else 0
        run_words = best_len + width - 1 if best_len else 0
        start = best_end - best_len + 1
        snippet = " ".join(words[start:start + run_words])
        counts = Counter(t for g, hit in zip(grams, hits) if hit for t in where[g])
        fraction = sum(hits) / len(grams) if grams else 0.0
        out.append(EvalLeak(row=num, ngrams=len(grams), shared=sum(hits), fraction=round(fraction, 4),
                            longest_run=run_words, snippet=snippet[:117] + "..." if len(snippet) > 120 else snippet,
                            train_rows=sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:3],
                            contaminated=fraction >= threshold))
    return ContaminationReport(train=str(train_path), eval=str(eval_path), n=n, threshold=threshold,
                               train_rows=len(train_rows), rows=out)


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
# Inter-rater agreement

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
        lengths.append((num, measure("\n".join(_contents(chosen))), measure("\n".join(_contents(rejected)))))
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
