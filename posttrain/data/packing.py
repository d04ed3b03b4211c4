"""Best-fit packing of sequences into rows of a fixed capacity, and the tokens a preference pair takes in a row.

How packed rows become batches whose segments cannot attend to each other is ``collate``.

May import: posttrain.data.render, pairs.
"""

from __future__ import annotations

import bisect

from posttrain.data.pairs import Pair
from posttrain.data.render import Example


def best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: place each sequence (longest first) in the fullest bin it still fits."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, bin index), kept sorted
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"sequence {i} has {n} tokens, more than the packing capacity {capacity}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (space - n, b))
        else:
            bins.append([i])
            bisect.insort(free, (capacity - n, len(bins) - 1))
    return bins


def shared_prefix(c: Example, r: Example) -> int:
    """Leading tokens chosen and rejected have in common before either response starts: the rendered prompt."""
    limit = min(c.trained.index(True), r.trained.index(True))
    n = 0
    while n < limit and c.input_ids[n] == r.input_ids[n]:
        n += 1
    return n


def row_len(p: Pair, share_prompt: bool) -> int:
    """Tokens a pair takes in a batch row."""
    return len(p) - (shared_prefix(p.chosen, p.rejected) if share_prompt else 0)
