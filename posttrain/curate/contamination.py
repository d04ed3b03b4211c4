"""Train/eval contamination: the share of each eval row's word n-grams found in the training file.

Layer 6 (curate): may import posttrain.data, models, errors and io; never config.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from posttrain.curate.text import check_fraction, ngrams, row_text
from posttrain.data.readers import read_rows
from posttrain.errors import ConfigError


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
    check_fraction("threshold", threshold)
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
