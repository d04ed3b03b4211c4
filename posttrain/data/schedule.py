"""Deterministic batches by optimizer step, for SFT examples and preference pairs.

A ``StepSchedule`` holds the units of a data set (what one batch row is made of: a packed row of examples or
pairs, or a single one) and the function that collates a micro-batch of them; ``sft_schedule`` and
``pair_schedule`` build one for each kind of data.

May import: posttrain.data.render, pairs, packing, collate.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Generic, TypeVar

import torch

from posttrain.data.collate import PairBatch, SFTBatch, collate, collate_pairs
from posttrain.data.packing import best_fit, row_len
from posttrain.data.pairs import Pair
from posttrain.data.render import Example

B = TypeVar("B")


class StepSchedule(Generic[B]):
    """Deterministic batches by optimizer step, so a resumed run sees exactly the data it would have seen.

    Units are packed rows (lists of examples or pairs) or single ones. Epoch e visits the units in the order of a
    permutation seeded by (seed, e); step s takes the next ``micro_batch_size * grad_accum * world_size`` units of
    that endless sequence, rank r micro-batch m the ``micro_batch_size`` of them at ``(m * world_size + r)``.
    Nothing about the position needs saving beyond the step number.

    With fewer units than a step takes, each step holds some units twice or more (it wraps into the next epoch's
    permutation). That is allowed rather than refused, since tiny sets (smoke tests, a handful of examples) are
    common and still give a valid objective, but ``repeat_warning`` says so before training.
    """

    def __init__(self, units: list[list[Any]], collate_fn: Callable[[list[list[Any]]], B], *, micro_batch_size: int,
                 grad_accum: int, seed: int, world_size: int = 1, rank: int = 0, unit_name: str = "units"):
        self.units, self.collate_fn, self.unit_name = units, collate_fn, unit_name
        self.micro, self.accum, self.seed = micro_batch_size, grad_accum, seed
        self.world_size, self.rank = world_size, rank
        self.per_step = micro_batch_size * grad_accum * world_size
        self._orders: dict[int, list[int]] = {}

    def steps_for(self, epochs: float) -> int:
        return max(1, math.ceil(epochs * len(self.units) / self.per_step))

    def epochs_text(self, steps: int, epochs: float) -> str:
        """The epochs ``steps`` optimizer steps really cover, e.g. ``0.35 epochs (max_steps cuts 2.0)``, for the
        line printed before training: max_steps overrides train.epochs, and steps are whole."""
        covered = self.epoch_of(steps)
        if abs(covered - epochs) < 0.005:
            return f"{epochs} epochs"
        planned = self.steps_for(epochs)
        why = ("rounded up to whole steps" if steps == planned else
               f"max_steps cuts {epochs}" if steps < planned else f"max_steps runs past {epochs}")
        return f"{covered:.3g} epochs ({why})"

    def repeat_warning(self) -> str:
        """'' or, when a step needs more units than there are, a line saying every step repeats some of them."""
        n = len(self.units)
        if n >= self.per_step:
            return ""
        uneven = ", some more often than others" if self.per_step % n else ""
        ranks = " x ranks" if self.world_size > 1 else ""
        return (f"\nwarning: only {n} {self.unit_name} for a step of {self.per_step}: each step repeats rows"
                f"{uneven}; make micro_batch_size x grad_accum{ranks} at most {n} to use each once per step")

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(len(self.units), generator=g).tolist()}
        return self._orders[epoch]

    def unit(self, k: int) -> list[Any]:
        """Unit ``k`` of the endless sequence the steps take their units from."""
        epoch, i = divmod(k, len(self.units))
        return self.units[self._order(epoch)[i]]

    def step(self, step: int) -> list[B]:
        """This rank's micro-batches for optimizer step ``step``."""
        first = step * self.per_step
        batches = []
        for m in range(self.accum):
            start = first + (m * self.world_size + self.rank) * self.micro
            batches.append(self.collate_fn([self.unit(k) for k in range(start, start + self.micro)]))
        return batches

    def epoch_of(self, step: int) -> float:
        return step * self.per_step / len(self.units)


def sft_schedule(examples: list[Example], *, micro_batch_size: int, grad_accum: int, seed: int, pad_id: int,
                 packing: bool, max_seq_len: int, world_size: int = 1, rank: int = 0) -> StepSchedule[SFTBatch]:
    """Batches of examples; with packing, examples share rows of up to ``max_seq_len`` tokens (best fit)."""
    if packing:
        units = [[examples[i] for i in b] for b in best_fit([len(e) for e in examples], max_seq_len)]
    else:
        units = [[e] for e in examples]
    return StepSchedule(units, functools.partial(collate, pad_id=pad_id), micro_batch_size=micro_batch_size,
                        grad_accum=grad_accum, seed=seed, world_size=world_size, rank=rank,
                        unit_name="packed rows" if packing else "examples")


def _collate_pair_units(units: list[list[Pair]], *, pad_id: int, share_prompt: bool,
                        repack_cap: int | None) -> PairBatch:
    """With ``repack_cap`` (no packing), the micro-batch's pairs are first laid into as few rows as they fit in."""
    if repack_cap is not None:
        pairs = [p for unit in units for p in unit]
        lengths = [row_len(p, share_prompt) for p in pairs]
        units = [[pairs[i] for i in b] for b in best_fit(lengths, max(repack_cap, *lengths))]
    return collate_pairs(units, pad_id, share_prompt)


def pair_schedule(pairs: list[Pair], *, micro_batch_size: int, grad_accum: int, seed: int, pad_id: int,
                  packing: bool, max_seq_len: int, share_prompt: bool = True, world_size: int = 1,
                  rank: int = 0) -> StepSchedule[PairBatch]:
    """Batches of pairs; with packing, several pairs share a row of up to ``2 * max_seq_len`` tokens. Without
    packing a micro-batch holds ``micro_batch_size`` pairs, but it is still laid out padding-free: its pairs fill as
    few rows of that size as they fit in, so no pair is padded to the longest one (the loss is the same either way;
    only the padding goes)."""
    row_cap = 2 * max_seq_len
    if packing:
        units = [[pairs[i] for i in b] for b in best_fit([row_len(p, share_prompt) for p in pairs], row_cap)]
    else:
        units = [[p] for p in pairs]
    fn = functools.partial(_collate_pair_units, pad_id=pad_id, share_prompt=share_prompt,
                           repack_cap=None if packing else row_cap)
    return StepSchedule(units, fn, micro_batch_size=micro_batch_size, grad_accum=grad_accum, seed=seed,
                        world_size=world_size, rank=rank, unit_name="packed rows" if packing else "pairs")
