"""ORPO, CPO, per-token IPO and KTO against numbers worked by hand, and against TRL's own expressions re-typed here
(softplus(-x) = -log sigmoid(x) = ln(1 + e^-x); sigmoid(ln 3) = 3/4, sigmoid(ln 2) = 2/3)."""

import math

import pytest
import torch
import torch.nn.functional as F

from posttrain.losses import (
    PREFERENCE_LOSSES,
    PairLogps,
    cpo,
    ipo,
    ipo_per_token,
    kto_loss,
    kto_z0,
    mismatched_order,
    orpo,
)
from tests.helpers import preference_params

LN2, LN3 = math.log(2.0), math.log(3.0)


def logps(pc, pr, rc=None, rr=None, lc=None, lr=None, grad=False):
    t = lambda v: None if v is None else torch.tensor([v], dtype=torch.float64, requires_grad=grad)
    return PairLogps(t(pc), t(pr), t(rc), t(rr), t(lc), t(lr))


def token_logps(batch, width, lengths, seed):
    """Random per-token log-probs (batch, width) with a response mask of the given lengths, as a trainer sees them."""
    g = torch.Generator().manual_seed(seed)
    tok = (-3.0 * torch.rand(batch, width, generator=g, dtype=torch.float64)).requires_grad_()
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).double()
    return tok, mask


# ---- ORPO (Hong et al. 2024) -------------------------------------------------------------------------------------

def test_orpo_worked_example_and_gradients():
    # chosen: mean log-prob ln(1/2) over 2 tokens -> P = 1/2, odds 1, log odds 0
    # rejected: mean ln(1/3) over 3 tokens -> P = 1/3, odds 1/2, log odds -ln 2
    # L_OR = -log sigmoid(0 - (-ln 2)) = -ln(2/3) = 0.405465; NLL = ln 2 = 0.693147
    # lambda 0.1: 0.693147 + 0.0405465 = 0.733694
    x = logps(2 * math.log(0.5), 3 * math.log(1 / 3), lc=2.0, lr=3.0, grad=True)
    loss, chosen, rejected = orpo(x, preference_params(beta=0.1, orpo_lambda=0.1))
    assert float(loss.detach()) == pytest.approx(LN2 + 0.1 * math.log(1.5), abs=1e-9)
    assert float(chosen) == pytest.approx(-0.1 * LN2)  # beta * mean log-prob
    assert float(rejected) == pytest.approx(-0.1 * LN3)
    loss.sum().backward()
    # dL_OR/du = -(1 - sigmoid(ln 2)) = -1/3; d log odds / d mean = 1 / (1 - P): 2 (chosen), 1.5 (rejected)
    # chosen: (1/2) * (-1 + 0.1 * (-1/3) * 2) = -0.533333; rejected: (1/3) * 0.1 * (-1/3) * (-1.5) = 0.0166667
    assert float(x.policy_chosen.grad) == pytest.approx(-0.5333333, abs=1e-6)
    assert float(x.policy_rejected.grad) == pytest.approx(0.0166667, abs=1e-6)


def test_orpo_at_lambda_zero_is_the_chosen_nll_alone():
    x = logps(-6.0, -1.0, lc=4.0, lr=2.0, grad=True)
    loss, chosen, _ = orpo(x, preference_params(beta=0.1, orpo_lambda=0.0))
    assert float(loss.detach()) == pytest.approx(1.5)  # 6 / 4 tokens
    assert float(chosen) == pytest.approx(-0.15)  # rewards use beta, so they do not vanish with lambda
    loss.sum().backward()
    assert float(x.policy_chosen.grad) == pytest.approx(-0.25)  # -1 / |y_w|
    assert float(x.policy_rejected.grad) == 0.0


def test_orpo_is_finite_when_a_response_is_certain():
    # mean log-prob 0 (P = 1) makes log(1 - P) = -inf; the cap keeps the value and the gradient finite
    for pc, pr in [(0.0, -1.0), (-1.0, 0.0), (0.0, 0.0)]:
        x = logps(pc, pr, lc=3.0, lr=3.0, grad=True)
        loss, _, _ = orpo(x, preference_params())
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(x.policy_chosen.grad).all()
        assert torch.isfinite(x.policy_rejected.grad).all()
    # a certain rejected response is punished hard and pushed down: log odds ln(1e6) vs 0 gives L_OR ~ 13.8
    x = logps(2 * math.log(0.5), 0.0, lc=2.0, lr=3.0, grad=True)
    loss, _, _ = orpo(x, preference_params(orpo_lambda=1.0))
    loss.sum().backward()
    assert float(loss.detach()) > LN2 + 13.0
    assert float(x.policy_rejected.grad) > 0.0


def trl_log1mexp(x):
    # trl/experimental/orpo/orpo_trainer.py, log1mexp
    t = -0.6931471805599453
    return torch.where(x < t, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def trl_orpo(tok, mask, lam):
    """trl/experimental/orpo/orpo_trainer.py: get_batch_logps(average_log_prob=True), odds_ratio_loss, and
    get_batch_loss_metrics' ``loss = policy_nll_loss - losses.mean()``; the NLL is CrossEntropyLoss over the
    chosen rows' labelled tokens (here only the response is labelled)."""
    n = tok.shape[0] // 2
    all_logps = (tok * mask).sum(-1) / mask.sum(-1)
    policy_chosen_logps, policy_rejected_logps = all_logps[:n], all_logps[n:]
    policy_nll_loss = -(tok[:n] * mask[:n]).sum() / mask[:n].sum()
    log_odds = (policy_chosen_logps - policy_rejected_logps) - (
        trl_log1mexp(policy_chosen_logps) - trl_log1mexp(policy_rejected_logps))
    losses = lam * F.logsigmoid(log_odds)
    return policy_nll_loss - losses.mean(), losses, lam * policy_chosen_logps, lam * policy_rejected_logps


def pairs_from_tokens(tok, mask):
    n = tok.shape[0] // 2
    s, length = (tok * mask).sum(-1), mask.sum(-1)
    return PairLogps(s[:n], s[n:], None, None, length[:n], length[n:])


def test_orpo_matches_trls_formula():
    # chosen rows of equal length, so TRL's batch-token NLL is the mean of the per-pair NLLs; rejected lengths vary
    tok, mask = token_logps(8, 12, [12, 12, 12, 12, 3, 7, 12, 1], seed=0)
    want, _, want_c, want_r = trl_orpo(tok, mask, 0.2)
    (want_grad,) = torch.autograd.grad(want, tok)
    loss, chosen, rejected = orpo(pairs_from_tokens(tok, mask), preference_params(beta=0.2, orpo_lambda=0.2))
    (got_grad,) = torch.autograd.grad(loss.mean(), tok)
    assert float(loss.mean().detach()) == pytest.approx(float(want.detach()), abs=1e-5)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(chosen, want_c.detach(), atol=1e-5, rtol=0)  # the same when beta == lambda
    torch.testing.assert_close(rejected, want_r.detach(), atol=1e-5, rtol=0)
    # with unequal chosen lengths the odds-ratio term still equals TRL's per pair
    tok, mask = token_logps(8, 12, [2, 9, 12, 5, 3, 7, 12, 1], seed=1)
    _, trl_terms, _, _ = trl_orpo(tok, mask, 0.2)
    x = pairs_from_tokens(tok, mask)
    loss, _, _ = orpo(x, preference_params(orpo_lambda=0.2))
    torch.testing.assert_close(loss + x.policy_chosen / x.len_chosen, -trl_terms, atol=1e-5, rtol=0)


# ---- CPO (Xu et al. 2024) ----------------------------------------------------------------------------------------

def test_cpo_worked_example_and_gradients():
    # summed log-probs -9 and -11, beta 0.5: logit 0.5 * 2 = 1 -> ln(1 + e^-1) = 0.313262; NLL 9 / 3 tokens = 3
    x = logps(-9.0, -11.0, lc=3.0, lr=5.0, grad=True)
    loss, chosen, rejected = cpo(x, preference_params(beta=0.5, cpo_alpha=1.0))
    assert float(loss.detach()) == pytest.approx(0.3132617 + 3.0, abs=1e-6)
    assert (float(chosen), float(rejected)) == (-4.5, -5.5)  # beta * summed log-probs
    loss.sum().backward()
    # dL/dlogit = -sigmoid(-1) = -0.268941, times +-beta; the NLL adds -alpha / |y_w| = -1/3 to the chosen
    assert float(x.policy_chosen.grad) == pytest.approx(-0.5 * 0.2689414 - 1 / 3, abs=1e-6)
    assert float(x.policy_rejected.grad) == pytest.approx(0.5 * 0.2689414, abs=1e-6)
    # alpha 0.5 halves the NLL: 0.313262 + 1.5
    assert float(cpo(x, preference_params(beta=0.5, cpo_alpha=0.5))[0].detach()) == pytest.approx(1.8132617, abs=1e-6)


def trl_cpo(tok, mask, beta, label_smoothing, cpo_alpha):
    """trl/experimental/cpo/cpo_trainer.py: concatenated_forward (summed log-probs for loss_type="sigmoid", the
    NLL as CrossEntropyLoss over the chosen rows' labels), cpo_loss (alpha = 0, "sigmoid") and
    get_batch_loss_metrics' ``loss = losses.mean() + self.cpo_alpha * policy_nll_loss``."""
    n = tok.shape[0] // 2
    all_logps = (tok * mask).sum(-1)
    policy_chosen_logps, policy_rejected_logps = all_logps[:n], all_logps[n:]
    nll_loss = -(tok[:n] * mask[:n]).sum() / mask[:n].sum()
    logits = policy_chosen_logps - policy_rejected_logps
    losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
              - F.logsigmoid(-beta * logits) * label_smoothing)
    return losses.mean() + cpo_alpha * nll_loss, losses, beta * policy_chosen_logps, beta * policy_rejected_logps


def test_cpo_matches_trls_formula():
    tok, mask = token_logps(8, 10, [10, 10, 10, 10, 4, 10, 2, 7], seed=2)
    p = preference_params(beta=0.3, label_smoothing=0.1, cpo_alpha=0.7)
    want, _, want_c, want_r = trl_cpo(tok, mask, 0.3, 0.1, 0.7)
    (want_grad,) = torch.autograd.grad(want, tok)
    loss, chosen, rejected = cpo(pairs_from_tokens(tok, mask), p)
    (got_grad,) = torch.autograd.grad(loss.mean(), tok)
    assert float(loss.mean().detach()) == pytest.approx(float(want.detach()), abs=1e-5)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(chosen, want_c.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(rejected, want_r.detach(), atol=1e-5, rtol=0)
    # unequal chosen lengths: the preference term per pair is still TRL's
    tok, mask = token_logps(8, 10, [1, 6, 10, 3, 4, 10, 2, 7], seed=3)
    x = pairs_from_tokens(tok, mask)
    _, trl_terms, _, _ = trl_cpo(tok, mask, 0.3, 0.1, 0.7)
    torch.testing.assert_close(cpo(x, p)[0] + 0.7 * x.policy_chosen / x.len_chosen, trl_terms, atol=1e-5, rtol=0)


# ---- IPO, per token ----------------------------------------------------------------------------------------------

def test_ipo_per_token_averages_the_log_ratios():
    # log-ratios +2 over 4 tokens and -3 over 6: per token +0.5 and -0.5, h = 1
    x = logps(-8.0, -13.0, -10.0, -10.0, lc=4.0, lr=6.0)
    assert float(ipo_per_token(x, preference_params(beta=0.5))[0]) == pytest.approx(0.0)  # (1 - 1)^2
    assert float(ipo_per_token(x, preference_params(beta=1.0))[0]) == pytest.approx(0.25)  # (1 - 0.5)^2
    assert float(ipo_per_token(x, preference_params(beta=0.25))[0]) == pytest.approx(1.0)  # (1 - 2)^2
    _, chosen, rejected = ipo_per_token(x, preference_params(beta=1.0))
    assert (float(chosen), float(rejected)) == (0.5, -0.5)
    # the summed IPO sees h = 2 - (-3) = 5: (5 - 0.5)^2 = 20.25 at the same beta
    assert float(ipo(x, preference_params(beta=1.0))[0]) == pytest.approx(20.25)


def test_ipo_per_token_is_length_invariant_and_summed_ipo_is_not():
    # both responses twice as long with the same per-token log-ratios: h per token stays 1, summed h goes 5 -> 10
    short = logps(-8.0, -13.0, -10.0, -10.0, lc=4.0, lr=6.0)
    long = logps(-16.0, -26.0, -20.0, -20.0, lc=8.0, lr=12.0)
    p = preference_params(beta=1.0)
    assert float(ipo_per_token(long, p)[0]) == float(ipo_per_token(short, p)[0]) == pytest.approx(0.25)
    assert float(ipo(long, p)[0]) == pytest.approx(90.25)  # (10 - 0.5)^2


def test_ipo_per_token_matches_trls_formula():
    """trl/trainer/dpo_trainer.py, DPOTrainer._compute_loss, loss_type == "ipo" (f_divergence reverse_kl)."""
    g = torch.Generator().manual_seed(4)
    pc, pr, rc, rr = (-40.0 * torch.rand(16, generator=g, dtype=torch.float64) for _ in range(4))
    lc, lr = (torch.randint(1, 50, (16,), generator=g).double() for _ in range(2))
    beta = 0.2
    chosen_scores, rejected_scores = pc - rc, pr - rr
    chosen_avg_score = chosen_scores / lc.clamp(min=1.0)
    rejected_avg_score = rejected_scores / lr.clamp(min=1.0)
    ipo_delta = chosen_avg_score - rejected_avg_score
    want = (ipo_delta - 1 / (2 * beta)) ** 2
    got, _, _ = ipo_per_token(PairLogps(pc, pr, rc, rr, lc, lr), preference_params(beta=beta))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# ---- the table's flags -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(PREFERENCE_LOSSES))
def test_table_flags_say_what_each_loss_reads(name):
    entry, p = PREFERENCE_LOSSES[name], preference_params()
    full = dict(pc=-9.0, pr=-11.0, rc=-10.0, rr=-10.0, lc=3.0, lr=5.0)
    loss, _, _ = entry(logps(**full), p)
    assert torch.isfinite(loss).all()
    no_ref = logps(**{**full, "rc": None, "rr": None})
    no_len = logps(**{**full, "lc": None, "lr": None})
    for x, raises in [(no_ref, not entry.reference_free), (no_len, entry.needs_lengths)]:
        if raises:
            with pytest.raises(ValueError):
                entry(x, p)
        else:
            assert torch.isfinite(entry(x, p)[0]).all()


def test_new_losses_run_without_a_reference_model():
    from posttrain.methods.dpo import PreferenceMethod

    assert {n for n, e in PREFERENCE_LOSSES.items() if e.reference_free} == {"simpo", "orpo", "cpo"}
    for name in ("orpo", "cpo"):
        assert PreferenceMethod(name, preference_params(loss=name), None).reference_free
    with pytest.raises(ValueError, match="reference"):
        PreferenceMethod("ipo_per_token", preference_params(), None)


def test_orpo_and_cpo_defaults_are_the_papers():
    p = preference_params()
    assert (p.orpo_lambda, p.cpo_alpha) == (0.1, 1.0)  # TRL's ORPOConfig.beta and CPOConfig.cpo_alpha


# ---- KTO (Ethayarajh et al. 2024) --------------------------------------------------------------------------------

def test_mismatched_order_rotates_by_one():
    assert mismatched_order(2) == [1, 0]
    assert mismatched_order(4) == [3, 0, 1, 2]
    for n in range(2, 9):
        order = mismatched_order(n)
        assert sorted(order) == list(range(n))  # every completion used once
        assert all(order[i] != i for i in range(n))  # no prompt keeps its own completion
        # trl/trainer/kto_trainer.py, _prepare_dataset's add_kl_completion_ids: [c[-1]] + c[:-1]
        completions = [f"y{i}" for i in range(n)]
        assert [completions[j] for j in order] == [completions[-1]] + completions[:-1]
    with pytest.raises(ValueError, match="2 rows"):
        mismatched_order(1)


def test_kto_z0_from_a_mismatched_batch():
    # log pi(y_j | x_i) - log ref(y_j | x_i) for prompt i (row) and completion j (column); the rotation reads
    # (0, 2), (1, 0), (2, 1): 1, -1, 2 -> mean 2/3. Another pairing (i + 1) would read 5, 7, 9 -> 7.
    gap = torch.tensor([[0.3, 5.0, 1.0], [-1.0, 0.4, 7.0], [9.0, 2.0, 0.5]], dtype=torch.float64)
    ref = torch.full((3, 3), -20.0, dtype=torch.float64)
    policy = ref + gap
    rows, cols = torch.arange(3), torch.tensor(mismatched_order(3))
    z0 = kto_z0(policy[rows, cols], ref[rows, cols])
    assert float(z0) == pytest.approx(2 / 3)
    # the estimate can come out negative; a KL cannot: gaps -1, -2, 0 -> mean -1 -> z0 = 0
    assert float(kto_z0(torch.tensor([-11.0, -12.0, -10.0]), torch.full((3,), -10.0))) == 0.0


def test_kto_worked_example_with_class_weights():
    # beta 0.5, z0 1, lambda_D 1, lambda_U 1.5; r - z0 = +-2 ln 3 -> beta * that = +-ln 3, sigmoid 3/4 or 1/4
    r = torch.tensor([1 + 2 * LN3, 1.0, 1 - 2 * LN3, 1 + 2 * LN3], dtype=torch.float64)
    ref = torch.full((4,), -10.0, dtype=torch.float64)
    policy = (ref + r).requires_grad_()
    desirable = torch.tensor([True, True, False, False])
    loss, reward = kto_loss(policy, ref, desirable, torch.tensor(1.0), beta=0.5, desirable_weight=1.0,
                            undesirable_weight=1.5)
    # desirable: 1 - 3/4 = 1/4; 1 - sigmoid(0) = 1/2. undesirable: 1.5 (1 - sigmoid(ln 3)) = 0.375;
    # 1.5 (1 - sigmoid(-ln 3)) = 1.5 * 3/4 = 1.125
    torch.testing.assert_close(loss.detach(), torch.tensor([0.25, 0.5, 0.375, 1.125], dtype=torch.float64))
    torch.testing.assert_close(reward, 0.5 * r)
    loss.sum().backward()
    # d/dr: desirable -lambda beta s(1 - s), undesirable +lambda beta s(1 - s); s(1 - s) = 3/16 at +-ln 3, 1/4 at 0
    want = torch.tensor([-0.5 * 3 / 16, -0.5 / 4, 1.5 * 0.5 * 3 / 16, 1.5 * 0.5 * 3 / 16], dtype=torch.float64)
    torch.testing.assert_close(policy.grad, want)


def test_kto_z0_carries_no_gradient():
    policy_m = torch.tensor([-5.0, -7.0, -4.0], requires_grad=True)
    z0 = kto_z0(policy_m, torch.full((3,), -6.0))
    assert not z0.requires_grad
    policy = torch.tensor([-3.0, -9.0, -6.0], requires_grad=True)
    loss, _ = kto_loss(policy, torch.full((3,), -6.0), torch.tensor([True, False, True]), z0, beta=0.1)
    loss.sum().backward()
    assert policy_m.grad is None and policy.grad is not None and (policy.grad != 0).all()
    # a z0 that still has a graph (built by hand) is cut off inside kto_loss as well
    z_hand = (policy_m - 1.0).mean()
    loss, _ = kto_loss(policy.detach().requires_grad_(), torch.full((3,), -6.0), torch.tensor([True, False, True]),
                       z_hand, beta=0.1)
    loss.sum().backward()
    assert policy_m.grad is None


def test_kto_matches_trls_formula():
    """trl/trainer/kto_trainer.py, KTOTrainer._compute_loss with loss_type == "kto" (one process)."""
    g = torch.Generator().manual_seed(5)
    n, beta, dw, uw = 12, 0.3, 1.0, 1.33
    policy, ref, ref_kl_logps = (-30.0 * torch.rand(n, generator=g, dtype=torch.float64) for _ in range(3))
    kl_logps = ref_kl_logps + 2.0 * torch.rand(n, generator=g, dtype=torch.float64) - 0.5  # mean gap near 0.5
    desirable = torch.rand(n, generator=g) < 0.5
    kl = (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)
    chosen_logratios = policy[desirable] - ref[desirable]
    rejected_logratios = policy[~desirable] - ref[~desirable]
    chosen_losses = 1 - F.sigmoid(beta * (chosen_logratios - kl))
    rejected_losses = 1 - F.sigmoid(beta * (kl - rejected_logratios))
    want = torch.cat((dw * chosen_losses, uw * rejected_losses), 0)
    want_rewards = torch.cat((beta * chosen_logratios, beta * rejected_logratios), 0)
    z0 = kto_z0(kl_logps, ref_kl_logps)
    assert float(z0) == pytest.approx(float(kl), abs=1e-12) and float(z0) > 0
    loss, rewards = kto_loss(policy, ref, desirable, z0, beta, dw, uw)
    torch.testing.assert_close(torch.cat((loss[desirable], loss[~desirable])), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat((rewards[desirable], rewards[~desirable])), want_rewards, atol=1e-5, rtol=0)
