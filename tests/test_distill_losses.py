"""Distillation divergences (GKD): hand-worked numbers, TRL's generalized_jsd_loss re-implemented, chunked == plain."""

import math

import pytest
import torch
import torch.nn.functional as F

from posttrain.losses import DIVERGENCES, divergence_sum, linear_divergence_sum, token_divergence

# Two tokens. Student logits [0, ln 3]: q = [1/4, 3/4]. Teacher logits [0, 0]: p = [1/2, 1/2].
STUDENT = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
TEACHER = torch.tensor([[0.0, 0.0]], dtype=torch.float64)


def test_forward_kl_hand_worked():
    # KL(p || q) = 1/2 ln((1/2)/(1/4)) + 1/2 ln((1/2)/(3/4)) = 1/2 ln 2 + 1/2 ln(2/3) = 0.346574 - 0.202733
    expected = 0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0)
    assert expected == pytest.approx(0.143841, abs=1e-6)
    assert float(token_divergence(STUDENT, TEACHER, "forward_kl")) == pytest.approx(expected, abs=1e-12)


def test_reverse_kl_hand_worked():
    # KL(q || p) = 1/4 ln((1/4)/(1/2)) + 3/4 ln((3/4)/(1/2)) = -0.173287 + 0.304099
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert expected == pytest.approx(0.130812, abs=1e-6)
    assert float(token_divergence(STUDENT, TEACHER, "reverse_kl")) == pytest.approx(expected, abs=1e-12)


def test_jsd_hand_worked_at_a_half_and_a_quarter():
    # beta = 1/2: M = (p + q) / 2 = [3/8, 5/8].
    # KL(p || M) = 1/2 ln(4/3) + 1/2 ln(4/5) = 0.143841 - 0.111572 = 0.032269
    # KL(q || M) = 1/4 ln(2/3) + 3/4 ln(6/5) = -0.101366 + 0.136741 = 0.035375
    kl_t = 0.5 * math.log(4 / 3) + 0.5 * math.log(4 / 5)
    kl_s = 0.25 * math.log(2 / 3) + 0.75 * math.log(6 / 5)
    assert 0.5 * kl_t + 0.5 * kl_s == pytest.approx(0.033822, abs=1e-6)
    got = float(token_divergence(STUDENT, TEACHER, "jsd", beta=0.5))
    assert got == pytest.approx(0.5 * kl_t + 0.5 * kl_s, abs=1e-12)
    # beta = 1/4: M = 1/4 p + 3/4 q = [1/8 + 3/16, 1/8 + 9/16] = [5/16, 11/16].
    # KL(p || M) = 1/2 ln(8/5) + 1/2 ln(8/11); KL(q || M) = 1/4 ln(4/5) + 3/4 ln(12/11)
    kl_t = 0.5 * math.log(8 / 5) + 0.5 * math.log(8 / 11)
    kl_s = 0.25 * math.log(4 / 5) + 0.75 * math.log(12 / 11)
    got = float(token_divergence(STUDENT, TEACHER, "jsd", beta=0.25))
    assert got == pytest.approx(0.25 * kl_t + 0.75 * kl_s, abs=1e-12)


def test_jsd_ends_are_the_two_kls_and_equal_distributions_give_zero():
    for beta, name in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        assert float(token_divergence(STUDENT, TEACHER, "jsd", beta=beta)) == \
            pytest.approx(float(token_divergence(STUDENT, TEACHER, name)), abs=1e-12)
    for name in DIVERGENCES:
        assert float(token_divergence(STUDENT, STUDENT, name, beta=0.3)) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="beta"):
        token_divergence(STUDENT, TEACHER, "jsd", beta=1.5)


def test_temperature_divides_both_logits():
    # Logits [0, ln 9] at temperature 2 are [0, ln 3]: the student above. The teacher [0, 0] stays uniform.
    hot = torch.tensor([[0.0, math.log(9.0)]], dtype=torch.float64)
    for name in DIVERGENCES:
        assert float(token_divergence(hot, TEACHER, name, temperature=2.0)) == \
            pytest.approx(float(token_divergence(STUDENT, TEACHER, name)), abs=1e-12)


def test_masked_sum_counts_only_trained_positions():
    s = torch.cat([STUDENT, TEACHER, STUDENT])
    t = torch.cat([TEACHER, TEACHER, TEACHER])
    one = float(token_divergence(STUDENT, TEACHER, "reverse_kl"))
    assert float(divergence_sum(s, t, torch.tensor([1, 1, 0]), "reverse_kl")) == pytest.approx(one, abs=1e-12)
    assert float(divergence_sum(s, t, torch.tensor([1, 0, 1]), "reverse_kl")) == pytest.approx(2 * one, abs=1e-12)


def trl_generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0):
    """TRL's GKDTrainer.generalized_jsd_loss (trl/trainer/gkd_trainer.py), re-implemented from its source with
    reduction="sum": both logits over temperature, log-softmax, beta 0 / 1 as forward / reverse KL via F.kl_div,
    otherwise the logsumexp mixture; positions whose label is -100 dropped."""
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        beta = torch.tensor(beta, dtype=student_log_probs.dtype)
        mixture_log_probs = torch.logsumexp(
            torch.stack([student_log_probs + torch.log1p(-beta), teacher_log_probs + torch.log(beta)]), dim=0)
        kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
        jsd = beta * kl_teacher + (1 - beta) * kl_student
    if labels is not None:
        jsd = jsd[labels != -100]
    return jsd.sum()


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_matches_trl_generalized_jsd_loss(beta):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 11, generator=g) * 2
    teacher = torch.randn(2, 5, 11, generator=g) * 2
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[0, :2] = -100  # a prompt
    labels[1, 4] = -100  # padding
    want = trl_generalized_jsd_loss(student, teacher, labels, beta=beta, temperature=1.7)
    got = divergence_sum(student, teacher, labels != -100, "jsd", beta=beta, temperature=1.7)
    assert float(got) == pytest.approx(float(want), abs=1e-5)
    named = {0.0: "forward_kl", 1.0: "reverse_kl"}.get(beta)
    if named:
        assert float(divergence_sum(student, teacher, labels != -100, named, temperature=1.7)) == \
            pytest.approx(float(want), abs=1e-5)


@pytest.mark.parametrize("name,beta", [("forward_kl", 0.0), ("reverse_kl", 1.0), ("jsd", 0.5), ("jsd", 0.2)])
@pytest.mark.parametrize("shared_head", [False, True])
def test_chunked_equals_plain_in_value_and_gradients(name, beta, shared_head):
    g = torch.Generator().manual_seed(1)
    n, h_s, h_t, vocab = 37, 16, 12, 101
    h = torch.randn(n, h_s, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(vocab, h_s, dtype=torch.float64, generator=g, requires_grad=True)
    if shared_head:  # the shared-base teacher: same head, other hidden states
        th, tw = torch.randn(n, h_s, dtype=torch.float64, generator=g), w
    else:
        th, tw = torch.randn(n, h_t, dtype=torch.float64, generator=g), torch.randn(vocab, h_t, dtype=torch.float64,
                                                                                   generator=g)
    ones = torch.ones(n)
    plain = divergence_sum(h @ w.t(), (th @ tw.t()).detach(), ones, name, beta, temperature=1.3)
    gh, gw = torch.autograd.grad(3.0 * plain, (h, w))
    fkl = divergence_sum((h @ w.t()).detach(), (th @ tw.t()).detach(), ones, "forward_kl")
    for chunk in (1, 8, 10, 37, 1000):  # 10 and 8 do not divide 37
        got, got_fkl = linear_divergence_sum(h, th, w, tw, name, beta, temperature=1.3, chunk_size=chunk)
        assert float(got.detach()) == pytest.approx(float(plain), abs=1e-6)
        assert float(got_fkl) == pytest.approx(float(fkl), abs=1e-6) and not got_fkl.requires_grad
        ch, cw = torch.autograd.grad(3.0 * got, (h, w))
        assert torch.allclose(ch, gh, atol=1e-6) and torch.allclose(cw, gw, atol=1e-6)


def test_chunked_with_a_frozen_head_and_no_rows():
    h = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(20, 8)  # LoRA: the head is frozen
    value, _ = linear_divergence_sum(h, torch.randn(5, 8), w, w, "jsd", chunk_size=2)
    value.backward()
    assert h.grad is not None and w.grad is None
    empty, fkl = linear_divergence_sum(torch.zeros(0, 8, requires_grad=True), torch.zeros(0, 8), w, w, "jsd")
    assert float(empty.detach()) == 0.0 and float(fkl) == 0.0
    empty.backward()
    with pytest.raises(ValueError, match="one vocabulary"):
        linear_divergence_sum(h, torch.randn(5, 8), w, torch.randn(21, 8), "jsd")
