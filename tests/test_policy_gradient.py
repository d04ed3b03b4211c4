"""The policy-gradient tables (losses.advantages, losses.policy) against numbers worked by hand, and against the
formulas of TRL 1.16 (trl/trainer/grpo_trainer.py, _compute_loss and the advantage block of
_generate_and_score_completions) and verl (core_algos.compute_policy_loss's dual clip), transcribed below."""

import math

import pytest
import torch

from posttrain.losses.advantages import ADVANTAGES, GROUP_FILTERS, TRUNCATED, advantages
from posttrain.losses.cross_entropy import row_entropy, target_logps_entropy
from posttrain.losses.policy import (
    KL_ESTIMATORS,
    POLICY_LOSSES,
    Clip,
    PolicyGradient,
    clipped_surrogate,
    kl_penalty,
    policy_gradient_terms,
)
from posttrain.losses.reduce import AGGREGATIONS
from posttrain.rewards.functions import overlong

R4 = torch.tensor([0.8, 0.5, 0.3, 0.7], dtype=torch.float64)


def test_grpo_advantages_by_std():
    # mean 0.575; deviations +0.225 -0.075 -0.275 +0.125, squares sum 0.1475;
    # sample std sqrt(0.1475 / 3) = 0.221736, population std sqrt(0.1475 / 4) = 0.192029
    sample = advantages("grpo", R4, 4, "sample")
    assert sample.tolist() == pytest.approx([1.014718, -0.338239, -1.240211, 0.563732], abs=1e-5)
    population = advantages("grpo", R4, 4, "population")
    assert population.tolist() == pytest.approx([1.1717, -0.3906, -1.4321, 0.6509], abs=1e-4)
    assert float(population[0] / sample[0]) == pytest.approx(math.sqrt(4 / 3), abs=1e-5)  # the 1.155x of issue 22
    assert advantages("grpo", R4, 4, "none").tolist() == pytest.approx([0.225, -0.075, -0.275, 0.125], abs=1e-12)
    assert advantages("dr_grpo", R4, 4).tolist() == pytest.approx([0.225, -0.075, -0.275, 0.125], abs=1e-12)
    with pytest.raises(ValueError, match="groups of 3"):
        advantages("grpo", torch.zeros(4), 3)


def test_rloo_and_reinforce_pp_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    # i = 0: the others' mean (0 + 0 + 1) / 3 = 1/3, A = 2/3; i = 1: (1 + 0 + 1) / 3 = 2/3, A = -2/3
    assert advantages("rloo", r, 4).tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3], abs=1e-12)
    r = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)  # two groups of 2
    # batch mean 0.25; sample variance (0.5625 + 3 * 0.0625) / 3 = 0.25, std 0.5
    assert advantages("reinforce_pp", r, 2).tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5], abs=1e-5)
    # group means 0.5 and 0: d = [0.5, -0.5, 0, 0]; sample std sqrt(0.5 / 3) = 0.408248
    assert advantages("reinforce_pp_baseline", r, 2).tolist() == pytest.approx([1.224745, -1.224745, 0, 0],
                                                                               abs=1e-5)


@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"])
def test_a_group_of_equal_rewards_gets_zero_advantage(kind):
    adv = advantages(kind, torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=torch.float64), 2)
    assert adv[:2].tolist() == [0.0, 0.0] and abs(float(adv[2])) > 0.1


def trl_advantages(rewards, g, scale_rewards):
    """TRL 1.16's sum_then_normalize block (nanstd is Bessel-corrected)."""
    mean = rewards.view(-1, g).mean(1).repeat_interleave(g)
    std = rewards.view(-1, g).std(1, correction=1).repeat_interleave(g)
    adv = rewards - mean
    return adv if scale_rewards == "none" else adv / (std + 1e-4)


def trl_rloo_advantages(rewards, g):
    """TRL 1.16 RLOOTrainer: baseline (group sum - r_i) / (G - 1), normalize_advantages off."""
    grouped = rewards.view(-1, g)
    return (grouped - (grouped.sum(1, keepdim=True) - grouped) / (g - 1)).view(-1)


def test_advantages_equal_trls():
    torch.manual_seed(0)
    r = torch.rand(24, dtype=torch.float64)
    assert torch.allclose(advantages("rloo", r, 8), trl_rloo_advantages(r, 8), atol=1e-12)
    assert torch.allclose(advantages("grpo", r, 8, "sample", eps=1e-4), trl_advantages(r, 8, "group"), atol=1e-6)
    assert torch.allclose(advantages("dr_grpo", r, 8), trl_advantages(r, 8, "none"), atol=1e-6)
    assert set(ADVANTAGES) == {"grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"}
    assert ADVANTAGES["dr_grpo"].aggregation == "dr_grpo" and ADVANTAGES["grpo"].takes_std


def _loss_and_grad(log_ratio_value, adv, clip, level="token"):
    logp = torch.tensor([[log_ratio_value]], dtype=torch.float64, requires_grad=True)
    loss, bound = clipped_surrogate(logp, torch.tensor([adv], dtype=torch.float64), clip)
    loss.sum().backward()
    return float(loss.detach()), float(logp.grad), float(bound)


@pytest.mark.parametrize("adv,ratio,clip,value,blocked", [
    (1.0, 1.25, Clip(0.2, 0.28), -1.25, False),   # clip-higher: 1.25 < 1.28, still pushed up
    (1.0, 1.25, Clip(0.2, 0.2), -1.2, True),      # the symmetric clip stops it at 1.2
    (1.0, 1.30, Clip(0.2, 0.28), -1.28, True),
    (-1.0, 0.75, Clip(0.2, 0.28), 0.8, True),     # the low side is eps_low's: 0.8
    (-1.0, 0.85, Clip(0.2, 0.28), 0.85, False),
    (-1.0, 5.0, Clip(0.2, 0.2), 5.0, False),      # a huge ratio under A < 0: unbounded without the dual clip
    (-1.0, 5.0, Clip(0.2, 0.2, dual=3.0), 3.0, True),  # capped at -c A = 3, no gradient
    (-1.0, 2.0, Clip(0.2, 0.2, dual=3.0), 2.0, False),
    (1.0, 5.0, Clip(0.2, 0.2, dual=3.0), -1.2, True),  # the dual clip leaves A > 0 alone
])
def test_clip_bounds_by_hand(adv, ratio, clip, value, blocked):
    loss, grad, bound = _loss_and_grad(math.log(ratio), adv, clip)
    assert loss == pytest.approx(value) and bound == float(blocked)
    assert grad == (0.0 if blocked else pytest.approx(-ratio * adv))  # d(-rho A)/dlog rho = -rho A


def verl_dual_clip(log_ratio, adv, low, high, c):
    """verl core_algos.compute_policy_loss (vanilla) with clip_ratio_c."""
    ratio = torch.exp(log_ratio)
    pg1, pg2 = -adv * ratio, -adv * torch.clamp(ratio, 1 - low, 1 + high)
    clip1 = torch.maximum(pg1, pg2)
    clip2 = torch.min(-adv * c, clip1)
    return torch.where(adv < 0, clip2, clip1)


def test_dual_clip_equals_verls():
    torch.manual_seed(1)
    log_ratio = torch.randn(6, 9, dtype=torch.float64)
    adv = torch.randn(6, 1, dtype=torch.float64).expand(6, 9)
    ours, _ = clipped_surrogate(log_ratio, adv, Clip(0.2, 0.28, dual=3.0))
    assert torch.allclose(ours, verl_dual_clip(log_ratio, adv, 0.2, 0.28, 3.0), atol=1e-12)


def test_gspo_ratio_is_the_completion_geometric_mean():
    # log rho per token 0.1 and 0.3 (padding after): log s = 0.2, s = e^0.2 = 1.2214 > 1.2
    logp = torch.tensor([[0.1, 0.3, 9.0]], dtype=torch.float64, requires_grad=True)
    old, mask = torch.zeros(1, 3, dtype=torch.float64), torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    log_s = POLICY_LOSSES["gspo"](logp, old, mask)
    assert log_s.shape == (1, 1) and float(log_s) == pytest.approx(0.2)
    loss, bound = clipped_surrogate(log_s, torch.tensor([1.0], dtype=torch.float64), Clip(0.2, 0.2))
    assert float(loss) == pytest.approx(-1.2) and float(bound) == 1.0
    loss, _ = clipped_surrogate(POLICY_LOSSES["gspo"](logp, old, mask), torch.tensor([1.0], dtype=torch.float64),
                                Clip(0.2, 0.28))
    loss.sum().backward()  # d(-s)/dlogp_t = -s / |y| on each of the 2 tokens, 0 on padding
    assert logp.grad[0].tolist() == pytest.approx([-math.exp(0.2) / 2, -math.exp(0.2) / 2, 0.0])


def test_kl_estimators_by_hand_and_their_gradients():
    logp, ref = torch.tensor(-1.0, dtype=torch.float64), torch.tensor(-0.5, dtype=torch.float64)
    # d = ref - logp = 0.5: k1 = -0.5, k2 = 0.125, k3 = e^0.5 - 0.5 - 1 = 0.148721
    values = {k: float(fn(logp, ref)) for k, fn in KL_ESTIMATORS.items()}
    assert values == pytest.approx({"k1": -0.5, "k2": 0.125, "k3": 0.1487213}, abs=1e-6)
    for corrected, want in [(False, 1 - math.exp(0.5)), (True, -0.5)]:
        # plain k3: d/dlogp = 1 - e^d (the forward-KL gradient); times pi/sg(pi): log pi - log ref = -0.5
        x = logp.clone().requires_grad_(True)
        kl_penalty(x, ref, x.detach(), "k3", corrected).backward()
        assert float(x.grad) == pytest.approx(want)
        assert float(kl_penalty(x.detach(), ref, x.detach(), "k3", corrected)) == pytest.approx(0.1487213, abs=1e-6)


def test_unbiased_reverse_kl_gradient_on_a_categorical():
    """E_{y~pi}[grad (k3 * pi/sg pi)] equals grad KL(pi || ref) exactly, summed over a 3-token vocabulary."""
    theta = torch.tensor([0.2, -0.4, 0.9], dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.tensor([0.5, 0.1, -0.3], dtype=torch.float64), 0)
    logp = torch.log_softmax(theta, 0)
    exact = torch.autograd.grad((logp.exp() * (logp - ref)).sum(), theta)[0]
    for corrected, equal in [(True, True), (False, False)]:
        lp = torch.log_softmax(theta, 0)
        expected = (lp.exp().detach() * kl_penalty(lp, ref, lp.detach(), "k3", corrected)).sum()
        grad = torch.autograd.grad(expected, theta)[0]
        assert torch.allclose(grad, exact, atol=1e-12) == equal


def trl_loss(logp, old, ref, adv, mask, loss_type, level, eps_low, eps_high, beta, bias_correction, max_len):
    """TRL 1.16 GRPOTrainer._compute_loss for one micro-batch, one process, no accumulation."""
    adv = adv.unsqueeze(1)
    log_ratio = logp - old
    if level == "token":
        log_iw = log_ratio
    else:
        log_iw = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_iw)
    per_token_kl = torch.exp(ref - logp) - (ref - logp) - 1
    if bias_correction:
        per_token_kl = per_token_kl * coef_1
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv) + beta * per_token_kl
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type in ("bnpo", "dapo"):
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    return (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_len)  # dr_grpo


CASES = [("grpo", "grpo", "token", True, False), ("dapo", "dapo", "token", True, False),
         ("dr_grpo", "dr_grpo", "token", False, False), ("bnpo", "dapo", "token", False, False),
         ("grpo", "grpo", "sequence", False, False), ("grpo", "grpo", "token", True, True),
         ("dapo", "dapo", "token", True, True)]


@pytest.mark.parametrize("trl_type,ours,level,bias_correction,mask_truncated", CASES)
def test_loss_and_gradient_equal_trls(trl_type, ours, level, bias_correction, mask_truncated):
    torch.manual_seed(2)
    n, t, max_len = 5, 7, 9
    lengths = torch.tensor([7, 3, 5, 1, 6])
    mask = (torch.arange(t)[None] < lengths[:, None]).double()
    if mask_truncated:  # TRL's mask_truncated_completions zeroes the rows cut at the limit; ours: TRUNCATED["mask"]
        mask = mask * TRUNCATED["mask"](torch.tensor([False, True, True, False, True]))[:, None]
    old = -torch.rand(n, t, dtype=torch.float64) * 3
    ref = old + 0.1 * torch.randn(n, t, dtype=torch.float64)
    base = old + 0.8 * torch.randn(n, t, dtype=torch.float64)  # mu > 1: the ratio has moved, the clip binds
    adv = torch.randn(n, dtype=torch.float64)
    eps_low, eps_high, beta = 0.2, 0.28, 0.04

    logp_trl = base.clone().requires_grad_(True)
    want = trl_loss(logp_trl, old, ref, adv, mask, trl_type, level, eps_low, eps_high, beta, bias_correction, max_len)
    want.backward()

    logp = base.clone().requires_grad_(True)
    pg = PolicyGradient("gspo" if level == "sequence" else "ppo_clip", Clip(eps_low, eps_high), beta, "k3",
                        bias_correction)
    per_token, bound, _ = policy_gradient_terms(logp, old, adv, mask, ref, pg)
    total, units = AGGREGATIONS[ours](per_token, mask, max_len)
    (total / units).backward()
    assert float(bound.sum()) > 0  # the clip bound somewhere: the comparison covers it
    assert float(total / units) == pytest.approx(float(want), abs=1e-6)
    assert torch.allclose(logp.grad, logp_trl.grad, atol=1e-6)


def test_group_filter_and_truncation_tables():
    rewards = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    assert GROUP_FILTERS["drop_equal"](rewards).tolist() == [False, True, False]
    assert GROUP_FILTERS["none"](rewards).tolist() == [True, True, True]
    finished = torch.tensor([True, False, True])
    assert TRUNCATED["mask"](finished).tolist() == [1.0, 0.0, 1.0]
    assert TRUNCATED["train"](finished).tolist() == [1.0, 1.0, 1.0]


def test_overlong_soft_punishment_by_hand():
    # DAPO eq. 13 with L_max 100, L_cache 20: 0 up to 80 tokens, then (80 - n) / 20, -1 beyond 100
    got = overlong([None] * 5, [""] * 5, completion_tokens=[50, 80, 90, 100, 101], max_tokens=100, cache=20)
    assert got == pytest.approx([0.0, 0.0, -0.5, -1.0, -1.0])
    assert overlong([None], [""], completion_tokens=[95], max_tokens=100) == pytest.approx([-0.75])  # cache 20
    with pytest.raises(ValueError, match="max_tokens"):
        overlong([None], [""], completion_tokens=[3])


def test_entropy_equals_the_distributions_on_both_head_paths():
    torch.manual_seed(3)
    hidden, weight = torch.randn(7, 5, dtype=torch.float64), torch.randn(11, 5, dtype=torch.float64)
    targets = torch.randint(0, 11, (7,))
    probs = torch.softmax(hidden @ weight.t() / 0.7, -1)
    want = torch.distributions.Categorical(probs=probs).entropy()
    assert torch.allclose(row_entropy(torch.log_softmax(hidden @ weight.t() / 0.7, -1)), want, atol=1e-12)
    logp_a, ent_a = target_logps_entropy(hidden, weight, targets, 3, torch.float64, 0.7)  # no gradient
    h = hidden.clone().requires_grad_(True)
    logp_b, ent_b = target_logps_entropy(h, weight, targets, 3, torch.float64, 0.7)  # the frozen-head autograd path
    logp_b.sum().backward()
    assert torch.allclose(ent_a, want, atol=1e-12) and torch.allclose(ent_b, want, atol=1e-12)
    assert torch.allclose(logp_a, logp_b.detach(), atol=1e-12) and h.grad is not None and not ent_b.requires_grad
