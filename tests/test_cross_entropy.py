"""Cross-entropy against hand-worked numbers; the fused chunked LM-head loss against the plain one."""

import math

import torch

from posttrain.losses import linear_cross_entropy_sum, token_cross_entropy_sum


def test_cross_entropy_hand_worked():
    # logits [0, ln 3]: softmax = [1/4, 3/4]. Target 1 costs -ln(3/4) = 0.28768; target 0 costs ln 4 = 1.38629.
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])
    assert abs(float(token_cross_entropy_sum(logits[:1], torch.tensor([1]))) - 0.287682) < 1e-5
    assert abs(float(token_cross_entropy_sum(logits, torch.tensor([1, 0]))) - (0.287682 + 1.386294)) < 1e-5
    # Uniform logits over V classes cost ln V per token, whatever the target.
    assert abs(float(token_cross_entropy_sum(torch.zeros(3, 10), torch.tensor([0, 4, 9]))) - 3 * math.log(10)) < 1e-5


def test_linear_cross_entropy_hand_worked():
    # hidden (1, 2) = [1, 0]; weight rows [0, 0] and [ln 3, 5]: logits = [0, ln 3] as above.
    h = torch.tensor([[1.0, 0.0]], requires_grad=True)
    w = torch.tensor([[0.0, 0.0], [math.log(3.0), 5.0]], requires_grad=True)
    loss = linear_cross_entropy_sum(h, w, torch.tensor([1]))
    assert abs(loss.item() - 0.287682) < 1e-5
    loss.backward()
    # dL/dlogits = softmax - onehot = [1/4, -1/4]; dL/dh = [1/4, -1/4] @ W = [-ln3/4, -5/4].
    assert torch.allclose(h.grad, torch.tensor([[-math.log(3.0) / 4, -5 / 4]]), atol=1e-6)
    # dL/dW = outer([1/4, -1/4], h) = [[1/4, 0], [-1/4, 0]].
    assert torch.allclose(w.grad, torch.tensor([[0.25, 0.0], [-0.25, 0.0]]), atol=1e-6)


def test_linear_cross_entropy_matches_plain_in_value_and_gradients():
    torch.manual_seed(0)
    n, hdim, vocab = 37, 16, 101
    h = torch.randn(n, hdim, dtype=torch.float64, requires_grad=True)
    w = torch.randn(vocab, hdim, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, vocab, (n,))
    ref = token_cross_entropy_sum(h @ w.t(), t)
    gh, gw = torch.autograd.grad(2.5 * ref, (h, w))
    for chunk in (1, 8, 37, 1000):
        got = linear_cross_entropy_sum(h, w, t, chunk_size=chunk)
        assert torch.allclose(got, ref, rtol=1e-9)
        fh, fw = torch.autograd.grad(2.5 * got, (h, w))  # a scaled loss scales the stored gradients
        assert torch.allclose(fh, gh, atol=1e-5) and torch.allclose(fw, gw, atol=1e-5)


def test_linear_cross_entropy_frozen_head_and_empty():
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(20, 8)  # frozen head, as under LoRA
    linear_cross_entropy_sum(h, w, torch.tensor([1, 2, 3, 4])).backward()
    assert h.grad is not None and w.grad is None
    empty = linear_cross_entropy_sum(torch.zeros(0, 8, requires_grad=True), w, torch.zeros(0, dtype=torch.long))
    assert float(empty.detach()) == 0.0


def test_target_logps_hand_worked():
    from posttrain.losses import target_logps

    # hidden [1, 0]; head rows [0, 0] and [ln 3, 5]: logits [0, ln 3], softmax [1/4, 3/4], log p(1) = ln(3/4).
    h = torch.tensor([[1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([[0.0, 0.0], [math.log(3.0), 5.0]], dtype=torch.float64)
    logp = target_logps(h, w, torch.tensor([1]), 8, torch.float64)
    assert abs(float(logp) - math.log(0.75)) < 1e-12
    logp.sum().backward()
    # d log p(1) / dh = W[1] - softmax @ W = [ln3, 5] - 3/4 [ln3, 5] = [ln3/4, 5/4].
    assert torch.allclose(h.grad, torch.tensor([[math.log(3.0) / 4, 5 / 4]], dtype=torch.float64), atol=1e-12)


def test_target_logps_fused_gradient_equals_autograd():
    from posttrain.losses import target_logps

    torch.manual_seed(1)
    n, hdim, vocab = 29, 12, 97
    h = torch.randn(n, hdim, dtype=torch.float64, requires_grad=True)
    w = torch.randn(vocab, hdim, dtype=torch.float64)  # frozen: the fused path
    t = torch.randint(0, vocab, (n,))
    weights = torch.randn(n, dtype=torch.float64)  # per-token upstream gradients, as DPO and GRPO give
    for temperature in (1.0, 0.7):
        plain = torch.log_softmax(h @ w.t() / temperature, -1).gather(1, t[:, None])[:, 0]
        (want,) = torch.autograd.grad((plain * weights).sum(), h)
        for chunk in (1, 7, 29, 1000):
            got = target_logps(h, w, t, chunk, torch.float64, temperature)
            assert got.grad_fn is not None and "TargetLogps" in type(got.grad_fn).__name__
            assert torch.allclose(got, plain, atol=1e-12)
            (grad,) = torch.autograd.grad((got * weights).sum(), h)
            assert torch.allclose(grad, want, atol=1e-10)
        with torch.no_grad():  # the reference's pass: values only
            assert torch.allclose(target_logps(h, w, t, 5, torch.float64, temperature), plain, atol=1e-12)
    trained = w.clone().requires_grad_(True)  # a trained head keeps autograd's path, gradients for W included
    got = target_logps(h, trained, t, 7, torch.float64)
    gh, gw = torch.autograd.grad((got * weights).sum(), (h, trained))
    plain = torch.log_softmax(h @ trained.t(), -1).gather(1, t[:, None])[:, 0]
    wh, ww = torch.autograd.grad((plain * weights).sum(), (h, trained))
    assert torch.allclose(gh, wh, atol=1e-10) and torch.allclose(gw, ww, atol=1e-10)
