"""Learning-rate schedule: linear warmup, cosine decay to a floor; re-laid when a resumed run changes length."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """Multiplier of the peak lr per optimizer step (0-based; the lr used by the update of step ``step``).

    Steps ``< warmup_steps`` warm up linearly. From ``decay_from`` (the end of warmup unless re-laid) the multiplier
    falls along a half cosine from ``decay_start`` to ``min_ratio``, reached at the last step ``total_steps - 1``.
    """
    total_steps: int
    warmup_steps: int
    min_ratio: float
    decay_from: int | None = None
    decay_start: float = 1.0

    def __call__(self, step: int) -> float:
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        start = self.warmup_steps if self.decay_from is None else self.decay_from
        decay = max(1, self.total_steps - start - 1)
        # Clamped below: a re-laid schedule is only consulted from its resume step on.
        progress = min(1.0, max(0.0, (step - start) / decay))
        return self.min_ratio + (self.decay_start - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def relaid(self, at: int, total_steps: int) -> Schedule:
        """This schedule for a run resumed at step ``at`` that now ends after ``total_steps`` steps.

        Steps before ``at`` were taken at this schedule's lr, and step ``at`` keeps it too (the optimizer state saved
        with the checkpoint already holds it), so the curve is continuous. What is left of the decay is laid anew
        from there to the floor at the new last step: the lr never rises again. A resume inside the warmup finishes
        the warmup as planned (same number of steps), then decays from the peak over the new length.
        """
        if at < self.warmup_steps:
            return Schedule(total_steps, self.warmup_steps, self.min_ratio, self.decay_from, self.decay_start)
        return Schedule(total_steps, self.warmup_steps, self.min_ratio, decay_from=at, decay_start=self(at))


def warmup_cosine(step: int, *, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at ``step`` (0-based; the lr used by the update of step ``step``)."""
    return Schedule(total_steps, warmup_steps, min_ratio)(step)
