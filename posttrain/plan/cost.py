"""Prompt overhead against a one-time fine-tune: when does training pay for itself?

A long system prompt or few-shot examples are paid for on every query. A fine-tune that makes them
unnecessary costs once, plus whatever premium the provider charges per token for serving a fine-tuned model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from posttrain.errors import ConfigError

HORIZON_DAYS = (30, 90, 365)


@dataclass(frozen=True)
class Horizon:
    """Cumulative spend after ``days``: prompt overhead vs fine-tune (training + premium)."""

    days: int
    prompting: float
    fine_tune: float

    @property
    def saving(self) -> float:
        return self.prompting - self.fine_tune


@dataclass(frozen=True)
class CostPlan:
    prompt_tokens: int
    queries_per_day: float
    price_per_mtok: float
    training_cost: float
    premium_per_mtok: float
    query_tokens: int
    daily_overhead: float  # what the saved prompt tokens cost per day
    daily_premium: float  # the fine-tuned model's extra price on the tokens each query still sends
    horizons: tuple[Horizon, ...]

    @property
    def daily_saving(self) -> float:
        return self.daily_overhead - self.daily_premium

    @property
    def break_even_days(self) -> float | None:
        """Training cost / daily saving; None ("never") when fine-tuning saves nothing per day."""
        if self.daily_saving <= 0:
            return None
        return self.training_cost / self.daily_saving

    def to_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "queries_per_day": self.queries_per_day,
                "price_per_mtok": self.price_per_mtok, "training_cost": self.training_cost,
                "premium_per_mtok": self.premium_per_mtok, "query_tokens": self.query_tokens,
                "daily_overhead": self.daily_overhead, "daily_premium": self.daily_premium,
                "daily_saving": self.daily_saving,
                "break_even_days": self.break_even_days if self.break_even_days is not None else "never",
                "horizons": [{"days": h.days, "prompting": h.prompting, "fine_tune": h.fine_tune,
                              "saving": h.saving} for h in self.horizons]}


def plan_cost(prompt_tokens: int, queries_per_day: float, price_per_mtok: float, training_cost: float, *,
              premium_per_mtok: float = 0.0, query_tokens: int = 0,
              horizons: Sequence[int] = HORIZON_DAYS) -> CostPlan:
    """Daily prompt overhead = prompt_tokens * queries_per_day * price_per_mtok / 1e6.

    ``premium_per_mtok`` is how much more the fine-tuned model costs per 1M tokens; it applies to
    ``query_tokens``, the tokens each query still sends and receives (user message and answer), which is why
    a premium without them is an error rather than a premium silently worth nothing.
    """
    for name, value in (("prompt tokens", prompt_tokens), ("queries per day", queries_per_day),
                        ("price per 1M tokens", price_per_mtok), ("training cost", training_cost),
                        ("premium per 1M tokens", premium_per_mtok), ("query tokens", query_tokens)):
        if value < 0:
            raise ConfigError(f"{name} must be zero or more, got {value}")
    if premium_per_mtok > 0 and query_tokens == 0:
        raise ConfigError("a fine-tuned model premium needs the tokens each query still processes "
                          "(--query-tokens): the premium is charged on those")
    if any(d <= 0 for d in horizons):
        raise ConfigError(f"horizons must be positive numbers of days, got {list(horizons)}")
    daily_overhead = prompt_tokens * queries_per_day * price_per_mtok / 1e6
    daily_premium = query_tokens * queries_per_day * premium_per_mtok / 1e6
    rows = tuple(Horizon(days=d, prompting=daily_overhead * d, fine_tune=training_cost + daily_premium * d)
                 for d in horizons)
    return CostPlan(prompt_tokens=prompt_tokens, queries_per_day=queries_per_day, price_per_mtok=price_per_mtok,
                    training_cost=training_cost, premium_per_mtok=premium_per_mtok, query_tokens=query_tokens,
                    daily_overhead=daily_overhead, daily_premium=daily_premium, horizons=rows)
