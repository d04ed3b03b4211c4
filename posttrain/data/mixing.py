"""Mixing other data into an SFT set at a share of the whole: general instructions or replayed base answers."""

from __future__ import annotations

import random
from typing import Sequence, TypeVar

T = TypeVar("T")


def mix_counts(num_task: int, ratios: Sequence[float]) -> list[int]:
    """How many examples each extra source adds so it makes up its ratio of the mixed set.

    With task examples n and shares r_i of the final set, the set has n / (1 - sum r_i) examples, of which
    round(r_i * that) come from source i: 90 task examples with a 10% mix give 100 in all, 10 mixed in."""
    if sum(ratios) >= 1.0:
        raise ValueError(f"mixing ratios {list(ratios)} sum to 1 or more")
    total = num_task / (1.0 - sum(ratios))
    return [round(r * total) for r in ratios]


def sample_rows(items: Sequence[T], count: int, seed: int) -> list[T]:
    """``count`` items without replacement (seeded), in their file order; all of them when there are fewer."""
    if count >= len(items):
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), count))
    return [items[i] for i in keep]
