"""Best-fit packing and collation into (B, T) batches whose segments cannot attend to each other.

Every row of a batch is a list of segments; positions restart at 0 in each segment. With no 2D attention
mask, transformers builds a block-diagonal causal mask from those restarting position ids (for eager, SDPA
and flash attention alike), so packed examples stay independent. Padding is one more segment with no loss.
The tests check that a packed batch gives the same loss and gradients as the examples one by one.
"""

from __future__ import annotations

import bisect

import torch

from posttrain.data.render import Example

IGNORE = -100


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


def collate(rows: list[list[Example]], pad_id: int, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Batch rows of segments: ``input_ids``, ``labels`` (IGNORE where untrained) and ``position_ids``, all (B, T),
    plus ``num_tokens``, the count of non-padding tokens (for throughput), and ``row_tokens`` (B,), each row's
    non-padding tokens, which sit at the row's start."""
    width = max(sum(len(e) for e in row) for row in rows)
    width = max(width, pad_to or 0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for ex in row:
            n = len(ex)
            t = torch.tensor(ex.input_ids, dtype=torch.long)
            ids[r, at:at + n] = t
            mask = torch.tensor(ex.trained, dtype=torch.bool)
            mask[0] = False  # a segment's first token must not be predicted from the previous segment
            labels[r, at:at + n] = torch.where(mask, t, IGNORE)
            pos[r, at:at + n] = torch.arange(n)
            at += n
        pos[r, at:] = torch.arange(width - at)  # padding: its own segment
    row_tokens = torch.tensor([sum(len(e) for e in row) for row in rows])
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "num_tokens": row_tokens.sum(),
            "row_tokens": row_tokens}


def num_targets(batch: dict[str, torch.Tensor]) -> int:
    """Trained tokens in a batch: the normaliser of the token-mean loss."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())
