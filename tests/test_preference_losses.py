"""Preference losses against numbers worked by hand (softplus(-x) = -log sigmoid(x) = ln(1 + e^-x))."""

import math

import pytest
import torch

from posttrain.losses import PREFERENCE_LOSSES, PairLogps, bradley_terry, dpo_sigmoid, ipo, rpo, simpo
from tests.helpers import preference_params


def logps(pc, pr, rc=None, rr=None, lc=None, lr=None, grad=False):
    t = lambda v: None if v is None else torch.tensor([v], dtype=torch.float64, requires_grad=grad)
    return PairLogps(t(pc), t(pr), t(rc), t(rr), t(lc), t(lr))


def test_dpo_is_ln2_when_policy_equals_reference():
    x = logps(-12.3, -7.1, -12.3, -7.1)
    loss, chosen, rejected = dpo_sigmoid(x, preference_params(beta=0.1))
    assert float(loss) == pytest.approx(math.log(2), abs=1e-12)  # 0.6931
    assert float(chosen) == float(rejected) == 0.0


def test_dpo_worked_example_from_probabilities():
    # pi_ref(y_w)=0.05, pi_ref(y_l)=0.10, pi(y_w)=0.06, pi(y_l)=0.12, beta=1:
    # h = ln(0.06/0.05) - ln(0.12/0.10) = ln 1.2 - ln 1.2 = 0, so the loss is ln 2 = 0.69.
    x = logps(math.log(0.06), math.log(0.12), math.log(0.05), math.log(0.10))
    loss, _, _ = dpo_sigmoid(x, preference_params(beta=1.0))
    assert float(loss) == pytest.approx(0.6931, abs=1e-4)


def test_dpo_value_label_smoothing_and_gradient_sign():
    # log-ratios +1 (chosen) and -1 (rejected), beta 0.5: logit 0.5 - (-0.5) = 1 -> ln(1 + e^-1) = 0.313262
    x = logps(-9.0, -11.0, -10.0, -10.0, grad=True)
    loss, chosen, rejected = dpo_sigmoid(x, preference_params(beta=0.5))
    assert float(loss.detach()) == pytest.approx(0.3132617, abs=1e-6)
    assert (float(chosen), float(rejected)) == (0.5, -0.5)
    loss.sum().backward()
    # dL/dlogit = -sigmoid(-1) = -0.268941; chosen gets +beta, rejected -beta
    assert float(x.policy_chosen.grad) == pytest.approx(-0.5 * 0.2689414, abs=1e-6)  # descent raises chosen
    assert float(x.policy_rejected.grad) == pytest.approx(0.5 * 0.2689414, abs=1e-6)  # and lowers rejected
    # eps = 0.1: 0.9 ln(1 + e^-1) + 0.1 ln(1 + e^1) = 0.281936 + 0.131326 = 0.413262
    smoothed, _, _ = dpo_sigmoid(x, preference_params(beta=0.5, label_smoothing=0.1))
    assert float(smoothed.detach()) == pytest.approx(0.4132617, abs=1e-6)


def test_ipo_regresses_the_gap_onto_one_over_two_beta():
    x = logps(-9.0, -11.0, -10.0, -10.0)  # h = 1 - (-1) = 2
    assert float(ipo(x, preference_params(beta=0.5))[0]) == pytest.approx(1.0)  # (2 - 1)^2
    assert float(ipo(x, preference_params(beta=0.25))[0]) == pytest.approx(0.0)  # (2 - 2)^2
    assert float(ipo(x, preference_params(beta=1.0))[0]) == pytest.approx(2.25)  # (2 - 0.5)^2


def test_simpo_is_length_normalised_and_reference_free():
    # chosen -10 over 5 tokens, rejected -30 over 10, beta 2: rewards -4 and -6; gamma 0.5: logit 1.5
    x = logps(-10.0, -30.0, lc=5.0, lr=10.0)
    loss, chosen, rejected = simpo(x, preference_params(beta=2.0, gamma=0.5))
    assert (float(chosen), float(rejected)) == (-4.0, -6.0)
    assert float(loss) == pytest.approx(0.2014133, abs=1e-6)  # ln(1 + e^-1.5)


def test_bradley_terry_with_margin_and_length_term():
    c, r = torch.tensor([2.0]), torch.tensor([0.5])
    assert float(bradley_terry(c, r)) == pytest.approx(0.2014133, abs=1e-6)  # ln(1 + e^-1.5)
    assert float(bradley_terry(c, r, margin=1.0)) == pytest.approx(0.4740770, abs=1e-6)  # ln(1 + e^-0.5)
    # chosen 200 tokens longer, coef 1: logit 1.5 + 2 = 3.5 -> ln(1 + e^-3.5) = 0.029750
    got = bradley_terry(c, r, len_chosen=torch.tensor([300.0]), len_rejected=torch.tensor([100.0]), length_coef=1.0)
    assert float(got) == pytest.approx(0.0297504, abs=1e-6)


def test_losses_needing_a_reference_say_so():
    with pytest.raises(ValueError, match="reference"):
        PREFERENCE_LOSSES["dpo"](logps(-1.0, -2.0), preference_params())


def test_rpo_adds_the_chosen_per_token_nll():
    # the DPO example above (0.313262) plus alpha * (-(-9) / 3 tokens) = 0.5 * 3 = 1.5 -> 1.813262
    x = logps(-9.0, -11.0, -10.0, -10.0, lc=3.0, lr=5.0, grad=True)
    loss, chosen, rejected = rpo(x, preference_params(beta=0.5, rpo_alpha=0.5))
    assert float(loss.detach()) == pytest.approx(0.3132617 + 1.5, abs=1e-6)
    assert (float(chosen), float(rejected)) == (0.5, -0.5)
    loss.sum().backward()
    # the NLL adds -alpha / |y_w| = -1/6 to the chosen gradient; the rejected one is DPO's alone
    assert float(x.policy_chosen.grad) == pytest.approx(-0.5 * 0.2689414 - 0.5 / 3, abs=1e-6)
    assert float(x.policy_rejected.grad) == pytest.approx(0.5 * 0.2689414, abs=1e-6)
