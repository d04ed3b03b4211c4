"""GRPO's aggregations (losses.reduce) against numbers worked by hand, and what splitting a step over micro-batches
or ranks does to them.

The loop's step loss is sum(micro-batch sums) / sum(micro-batch units) over every micro-batch and rank."""

import pytest
import torch

from posttrain.losses.reduce import (
    AGGREGATIONS,
    aggregate_constant,
    aggregate_sequence,
    aggregate_token,
    sequence_mean,
)

PAD = 100.0  # a loss value on padding: it must never count


def batch(*completions: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, mask) of completions padded to the longest, as collate_rollouts lays out a micro-batch."""
    width = max(len(c) for c in completions)
    loss = torch.full((len(completions), width), PAD, dtype=torch.float64)
    mask = torch.zeros((len(completions), width), dtype=torch.float64)
    for i, c in enumerate(completions):
        loss[i, :len(c)] = torch.tensor(c, dtype=torch.float64)
        mask[i, :len(c)] = 1.0
    return loss, mask


C0, C1, C2 = [1.0, 2.0, 3.0], [4.0], [2.0, 2.0]  # lengths 3, 1, 2; token sum 14 over 6 tokens
MAX_NEW = 4


def step_loss(agg, *parts: tuple[torch.Tensor, torch.Tensor]) -> float:
    sums, units = zip(*(agg(loss, mask, MAX_NEW) for loss, mask in parts))
    return float(sum(sums)) / sum(units)


def test_sequence_mean_divides_each_row_by_its_own_tokens():
    loss, mask = batch(C0, C1, C2)
    assert sequence_mean(loss, mask).tolist() == [2.0, 4.0, 2.0]
    empty = torch.zeros(1, 3, dtype=torch.float64)
    assert sequence_mean(torch.ones(1, 3), empty).tolist() == [0.0]  # no tokens: 0, not nan


def test_grpo_mean_of_completion_means():
    # (1+2+3)/3 = 2, 4/1 = 4, (2+2)/2 = 2 -> summed 8 over 3 completions
    loss, mask = batch(C0, C1, C2)
    total, units = aggregate_sequence(loss, mask, MAX_NEW)
    assert (float(total), units) == (8.0, 3)
    assert step_loss(aggregate_sequence, (loss, mask)) == pytest.approx(8 / 3)


def test_dapo_token_sum_over_tokens():
    # 1+2+3+4+2+2 = 14 over 6 tokens: every token weighs the same whatever its completion's length
    loss, mask = batch(C0, C1, C2)
    total, units = aggregate_token(loss, mask, MAX_NEW)
    assert (float(total), units) == (14.0, 6)
    assert step_loss(aggregate_token, (loss, mask)) == pytest.approx(14 / 6)


def test_dr_grpo_token_sum_over_max_new_per_completion():
    # 14 / max_new 4 = 3.5, over 3 completions -> 14 / (4 * 3)
    loss, mask = batch(C0, C1, C2)
    total, units = aggregate_constant(loss, mask, MAX_NEW)
    assert (float(total), units) == (3.5, 3)
    assert step_loss(aggregate_constant, (loss, mask)) == pytest.approx(14 / 12)


def test_the_table_names_each_aggregation():
    assert AGGREGATIONS == {"grpo": aggregate_sequence, "dapo": aggregate_token, "dr_grpo": aggregate_constant}


@pytest.mark.parametrize("name", sorted(AGGREGATIONS))
def test_two_ranks_equal_one_when_completions_stay_whole(name):
    """Rank A holds C0 and C1, rank B holds C2 (each padded to its own longest completion): summed losses over
    summed units give the one-rank loss. A mean of the ranks' own means would not: A and B hold different numbers
    of completions and tokens."""
    agg = AGGREGATIONS[name]
    one = step_loss(agg, batch(C0, C1, C2))
    a, b = batch(C0, C1), batch(C2)
    assert step_loss(agg, a, b) == pytest.approx(one, abs=1e-12)
    mean_of_means = (step_loss(agg, a) + step_loss(agg, b)) / 2
    assert mean_of_means != pytest.approx(one, abs=1e-6)


def test_splitting_one_completion_keeps_only_the_token_mean():
    """A completion's tokens split over two parts (C0 as [1, 2] and [3]; collate_rollouts never does this): DAPO's
    sums and token counts still add up; GRPO's per-completion mean and both completion counts do not."""
    whole = batch(C0, C1)
    split = (batch(C0[:2], C1), batch(C0[2:]))
    assert step_loss(aggregate_token, *split) == pytest.approx(step_loss(aggregate_token, whole))
    for agg in (aggregate_sequence, aggregate_constant):
        assert step_loss(agg, *split) != pytest.approx(step_loss(agg, whole))
