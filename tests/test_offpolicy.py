"""Train-inference mismatch and truncated importance weights, against numbers worked by hand."""

import math

import pytest
import torch

from posttrain.losses.offpolicy import IS_CORRECTIONS, Correction, corrected, importance_weights, logp_mismatch

# Two completions; the second has one padding position. log ratios (train - engine): [ln 2, 0, ln 0.5] and [ln 4, 0].
TRAIN = torch.tensor([[math.log(0.2), math.log(0.5), math.log(0.1)], [math.log(0.8), math.log(0.3), 0.0]])
ENGINE = torch.tensor([[math.log(0.1), math.log(0.5), math.log(0.2)], [math.log(0.2), math.log(0.3), -5.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def test_mismatch_metrics_by_hand():
    m = logp_mismatch(TRAIN, ENGINE, MASK)
    # |delta| on the 5 real tokens: ln 2, 0, ln 2, ln 4, 0 -> mean 4 ln 2 / 5, max ln 4 (padding's 5.0 ignored)
    assert m["mismatch/abs_mean"] == pytest.approx(4 * math.log(2) / 5)
    assert m["mismatch/abs_max"] == pytest.approx(math.log(4))
    # k3 = r - 1 - ln r: r = 2 -> 1 - ln 2; r = 1 -> 0; r = 0.5 -> -0.5 + ln 2; r = 4 -> 3 - ln 4
    k3 = (1 - math.log(2)) + (-0.5 + math.log(2)) + (3 - math.log(4))
    assert m["mismatch/kl"] == pytest.approx(k3 / 5)


def test_identical_policies_have_no_mismatch_and_unit_weights():
    m = logp_mismatch(TRAIN, TRAIN, MASK)
    assert m == {"mismatch/abs_mean": 0.0, "mismatch/abs_max": 0.0, "mismatch/kl": 0.0}
    for kind in IS_CORRECTIONS:
        assert torch.equal(importance_weights(TRAIN, TRAIN, MASK, kind), torch.ones(2, 3) * (MASK if kind != "none"
                                                                                              else 1))


def test_token_weights_are_the_ratios_truncated_at_the_cap():
    w = importance_weights(TRAIN, ENGINE, MASK, "token", cap=2.0)
    # ratios 2, 1, 0.5 | 4 -> capped at 2, 1 | padding 0
    assert torch.allclose(w, torch.tensor([[2.0, 1.0, 0.5], [2.0, 1.0, 0.0]]))
    assert torch.allclose(importance_weights(TRAIN, ENGINE, MASK, "token", cap=3.0)[1, 0], torch.tensor(3.0))


def test_sequence_weights_are_one_truncated_product_per_completion():
    w = importance_weights(TRAIN, ENGINE, MASK, "sequence", cap=5.0)
    # completion 1: 2 * 1 * 0.5 = 1; completion 2: 4 * 1 = 4 (under the cap), padding 0
    assert torch.allclose(w, torch.tensor([[1.0, 1.0, 1.0], [4.0, 4.0, 0.0]]))
    assert torch.allclose(importance_weights(TRAIN, ENGINE, MASK, "sequence", cap=2.0)[1, :2], torch.tensor(2.0))


def test_weights_carry_no_gradient_and_a_long_sequence_does_not_overflow():
    train = TRAIN.clone().requires_grad_(True)
    assert not importance_weights(train, ENGINE, MASK, "token").requires_grad
    huge = torch.full((1, 4000), 1.0)  # exp(4000) overflows; the clamp in log space keeps it at the cap
    assert float(importance_weights(huge, torch.zeros(1, 4000), torch.ones(1, 4000), "sequence", 2.0)[0, 0]) == 2.0


def test_bad_settings_are_errors():
    with pytest.raises(ValueError, match="unknown importance correction"):
        importance_weights(TRAIN, ENGINE, MASK, "tis")
    with pytest.raises(ValueError, match="cap must be positive"):
        importance_weights(TRAIN, ENGINE, MASK, "token", cap=0.0)


def test_corrected_weights_the_whole_per_token_loss_and_counts_the_capped():
    per_token = torch.full((2, 3), 3.0)
    out, m = corrected(per_token, TRAIN, ENGINE, MASK, Correction("token", 2.0))
    # weights 2, 1, 0.5 | min(4, 2) = 2, 1, padding 0: the loss 3 times each
    assert torch.allclose(out, 3.0 * torch.tensor([[2.0, 1.0, 0.5], [2.0, 1.0, 0.0]]))
    assert m["mismatch/is_weight"] == pytest.approx((2 + 1 + 0.5 + 2 + 1) / 5)
    assert m["mismatch/is_capped"] == pytest.approx(1 / 5)  # only the ratio 4 is cut (2 is at the cap, not past)
    assert m["mismatch/abs_mean"] == pytest.approx(4 * math.log(2) / 5)
    # sequence: products 2 * 1 * 0.5 = 1 and 4 * 1 = 4 -> weights 1 and min(4, 2) = 2; one of two completions cut
    out, m = corrected(per_token, TRAIN, ENGINE, MASK, Correction("sequence", 2.0))
    assert torch.allclose(out, 3.0 * torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]]))
    assert m["mismatch/is_capped"] == pytest.approx(1 / 2)
    assert m["mismatch/is_weight"] == pytest.approx((1 + 1 + 1 + 2 + 2) / 5)


def test_no_correction_measures_only():
    per_token = torch.randn(2, 3)
    for correction in (None, Correction("none", 2.0)):
        out, m = corrected(per_token, TRAIN, ENGINE, MASK, correction)
        assert out is per_token
        assert set(m) == {"mismatch/abs_mean", "mismatch/abs_max", "mismatch/kl"}
