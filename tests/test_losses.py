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
