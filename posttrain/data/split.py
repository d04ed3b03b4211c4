"""Held-out splits: which items of a data set are kept back for evaluation, fixed by a seed.

May import: nothing of posttrain.
"""

from __future__ import annotations

import random
from typing import Hashable, Sequence, TypeVar

T = TypeVar("T")


def holdout_split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, held-out); a fixed seed gives the same split on every run and machine."""
    if fraction <= 0 or n < 2:
        return list(range(n)), []
    order = list(range(n))
    random.Random(seed).shuffle(order)
    k = min(n - 1, max(1, round(n * fraction)))
    return sorted(order[k:]), sorted(order[:k])


def held_out(items: Sequence[T], fraction: float, seed: int, noun: str, limit: int | None = None,
             groups: Sequence[Hashable] | None = None) -> tuple[list[T], list[T], list[str]]:
    """(train items, held-out items, report lines) of a ``holdout_split``; the line, when anything is held out,
    is ``held out N of M <noun> (eval_fraction=..., split_seed=...)``. With ``limit``, only the first ``limit``
    held-out items are kept (the rest are in neither list).

    ``groups`` (one key per item, e.g. its question): the split draws whole groups, so items of one group are never
    on both sides. Several solutions of one question are the usual shape of process-reward data, and a question
    seen in training would flatter the held-out score."""
    if groups is None:
        keep, hold = holdout_split(len(items), fraction, seed)
        counted = ""
    else:
        order = list(dict.fromkeys(groups))
        _, hold_groups = holdout_split(len(order), fraction, seed)
        held = {order[g] for g in hold_groups}
        keep = [i for i, g in enumerate(groups) if g not in held]
        hold = [i for i, g in enumerate(groups) if g in held]
        counted = f", {len(held)} of {len(order)} groups"
    hold = hold[:limit] if limit else hold
    lines = [f"held out {len(hold)} of {len(items)} {noun}{counted} (eval_fraction={fraction}, split_seed={seed})"] \
        if hold else []
    return [items[i] for i in keep], [items[i] for i in hold], lines
