"""GRPO / PPO pieces against numbers worked by hand."""

import pytest
import torch

from posttrain.losses.rl import (
    clipped_surrogate,
    clipped_value_loss,
    gae,
    group_advantages,
    kl_k3,
    kl_shaped_rewards,
    whiten,
)


def test_group_advantages_worked_example():
    # mean 0.575; deviations +0.225 -0.075 -0.275 +0.125; population variance 0.1475 / 4 = 0.036875, std 0.192029
    adv = group_advantages(torch.tensor([0.8, 0.5, 0.3, 0.7], dtype=torch.float64), 4)
    assert adv.tolist() == pytest.approx([1.1717, -0.3906, -1.4321, 0.6509], abs=1e-4)
    assert [round(a, 2) for a in adv.tolist()] == [1.17, -0.39, -1.43, 0.65]
    assert float(adv.sum()) == pytest.approx(0.0, abs=1e-9)


def test_group_advantages_per_group_and_flat_groups():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.5]), 2)
    assert adv.tolist() == pytest.approx([1.0, -1.0, 0.0, 0.0], abs=1e-5)  # an all-equal group teaches nothing
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.zeros(4), 3)


@pytest.mark.parametrize("adv,ratio,blocked", [(1.0, 1.5, True), (1.0, 0.5, False), (-1.0, 0.5, True),
                                               (-1.0, 1.5, False), (1.0, 1.1, False), (-1.0, 0.9, False)])
def test_clipped_objective_gradient(adv, ratio, blocked):
    old = torch.tensor([[0.0]], dtype=torch.float64)
    logp = torch.tensor([[float(torch.log(torch.tensor(ratio)))]], dtype=torch.float64, requires_grad=True)
    loss, clipped = clipped_surrogate(logp, old, torch.tensor([adv], dtype=torch.float64), clip_eps=0.2)
    loss.sum().backward()
    if blocked:  # past the clip in the direction the advantage pushes: the loss is flat, no gradient
        assert float(logp.grad) == 0.0 and float(clipped) == 1.0
        assert float(loss.detach()) == pytest.approx(-(1.2 if adv > 0 else 0.8) * adv)
    else:  # d(-rho A)/dlogp = -rho A
        assert float(logp.grad) == pytest.approx(-ratio * adv) and float(clipped) == 0.0


def test_k3_is_zero_when_policy_equals_reference_and_positive_otherwise():
    logp = torch.tensor([-1.0, -2.0, -0.3])
    assert torch.equal(kl_k3(logp, logp), torch.zeros(3))
    # d = ref - logp = 0.5: e^0.5 - 0.5 - 1 = 0.148721
    assert float(kl_k3(torch.tensor(-1.0), torch.tensor(-0.5))) == pytest.approx(0.1487213, abs=1e-6)
    assert float(kl_k3(torch.tensor(-0.5), torch.tensor(-1.0))) == pytest.approx(0.1065307, abs=1e-6)  # e^-.5 -.5


def test_gae_three_step_trajectory():
    # r = [0, 0, 1], V = [0.5, 0.6, 0.7], V after the end = 0, gamma 0.9, lambda 0.95 (gamma lambda = 0.855):
    # delta_2 = 1 - 0.7 = 0.3; delta_1 = 0.9 * 0.7 - 0.6 = 0.03; delta_0 = 0.9 * 0.6 - 0.5 = 0.04
    # A_2 = 0.3; A_1 = 0.03 + 0.855 * 0.3 = 0.2865; A_0 = 0.04 + 0.855 * 0.2865 = 0.2849575
    r = torch.tensor([[0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)  # the 4th position is padding
    v = torch.tensor([[0.5, 0.6, 0.7, 9.9]], dtype=torch.float64)
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    adv, ret = gae(r, v, m, gamma=0.9, lam=0.95)
    assert adv[0].tolist() == pytest.approx([0.2849575, 0.2865, 0.3, 0.0], abs=1e-12)
    assert ret[0].tolist() == pytest.approx([0.7849575, 0.8865, 1.0, 0.0], abs=1e-12)


def test_value_loss_clipping():
    old, ret = torch.tensor([0.0, 0.0]), torch.tensor([1.0, -1.0])
    v = torch.tensor([0.5, 0.5], requires_grad=True)
    loss = clipped_value_loss(v, old, ret, clip_eps=0.2)
    # first: V=0.5 -> (0.5-1)^2 = 0.25; V_clip=0.2 -> 0.64; max 0.64 -> 0.32, and no gradient through V
    # second: V=0.5 -> (1.5)^2 = 2.25; V_clip=0.2 -> 1.44; max 2.25 -> 1.125, gradient V - R = 1.5
    assert loss.tolist() == pytest.approx([0.32, 1.125])
    loss.sum().backward()
    assert v.grad.tolist() == pytest.approx([0.0, 1.5])


def test_kl_shaped_rewards_put_the_score_on_the_last_token():
    logp = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -1.0], [-1.0, -2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    out = kl_shaped_rewards(torch.tensor([2.0, 3.0]), logp, ref, mask, kl_coef=0.1)
    assert out.flatten().tolist() == pytest.approx([-0.05, 0.0, 2.0, 0.0, 2.9, 0.0])


def test_whiten_masked():
    x = torch.tensor([[1.0, 3.0, 100.0]])
    m = torch.tensor([[1.0, 1.0, 0.0]])
    assert whiten(x, m)[0].tolist() == pytest.approx([-1.0, 1.0, 0.0], abs=1e-6)
