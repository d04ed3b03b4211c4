"""PPO pieces (rewards, GAE, whitening, the value loss) against numbers worked by hand; the policy-gradient tables
are in test_policy_gradient.py."""

import pytest
import torch

from posttrain.losses.rl import chained_gae, clipped_value_loss, gae, kl_shaped_rewards, whiten


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


def test_chained_gae_skips_environment_tokens_and_row_seams():
    """The three-step trajectory above (same r, V, gamma, lambda: same advantages), sampled over two turns with two
    environment tokens between them (their values, 9.0, must not enter), once in one row and once split into two
    rows at the environment's reply; and a one-token trajectory beside them: A = 2 - 0.5."""
    r = torch.tensor([[0.0, 0.0, 5.0, 5.0, 1.0, 0.0],  # trajectory 0: s s e e s pad
                      [0.0, 0.0, 5.0, 0.0, 0.0, 0.0],  # trajectory 1, first row: s s e
                      [1.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # trajectory 1, second row: s
                      [2.0, 0.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)  # trajectory 2: s
    v = torch.tensor([[0.5, 0.6, 9.0, 9.0, 0.7, 9.0], [0.5, 0.6, 9.0, 9.0, 9.0, 9.0],
                      [0.7, 9.0, 9.0, 9.0, 9.0, 9.0], [0.5, 9.0, 9.0, 9.0, 9.0, 9.0]], dtype=torch.float64)
    m = torch.tensor([[1, 1, 0, 0, 1, 0], [1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]],
                     dtype=torch.float64)
    adv, ret = chained_gae(r, v, m, [0, 1, 1, 2], gamma=0.9, lam=0.95)
    assert adv[0].tolist() == pytest.approx([0.2849575, 0.2865, 0.0, 0.0, 0.3, 0.0], abs=1e-12)
    assert adv[1, :2].tolist() == pytest.approx([0.2849575, 0.2865], abs=1e-12) and adv[2, 0] == pytest.approx(0.3)
    assert adv[3].tolist() == pytest.approx([1.5, 0, 0, 0, 0, 0], abs=1e-12)
    assert ret[0].tolist() == pytest.approx([0.7849575, 0.8865, 0.0, 0.0, 1.0, 0.0], abs=1e-12)
    assert (adv[m == 0] == 0).all() and (ret[m == 0] == 0).all()
    plain, _ = gae(r[:1], v[:1], m[:1], gamma=0.9, lam=0.95)  # within one row, gae's own masking chains the same
    assert torch.equal(plain, adv[:1])


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
