"""The fused LoRA forward (posttrain.models.lora.lora_linear) against PEFT's own, in value and gradients."""

import pytest
import torch

from posttrain.models.lora import MERGED_MIN_ROWS, apply_lora, fuse_lora_forward, lora_linear

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def plain_lora(x, w, bias, a, b, s):
    return torch.nn.functional.linear(x, w, bias) + (x @ a.t()) @ b.t() * s


@pytest.mark.parametrize("rows", [MERGED_MIN_ROWS + 7, 5])  # the merged-weight path and the skinny-matmul path
@pytest.mark.parametrize("with_bias", [True, False])
def test_lora_linear_equals_the_plain_formula(rows, with_bias):
    g = torch.Generator().manual_seed(0)
    d_in, d_out, r, s = 24, 40, 4, 2.5

    def leaf(*shape, grad=True):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)

    x, w = leaf(1, rows, d_in), leaf(d_out, d_in, grad=False)
    bias = leaf(d_out) if with_bias else None
    a, b = leaf(r, d_in), leaf(d_out, r)
    up = torch.randn(1, rows, d_out, generator=g, dtype=torch.float64)
    inputs = [t for t in (x, bias, a, b) if t is not None]

    want = plain_lora(x, w, bias, a, b, s)
    want_grads = torch.autograd.grad((want * up).sum(), inputs)
    got = lora_linear(x, w, bias, a, b, s)
    got_grads = torch.autograd.grad((got * up).sum(), inputs)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for gg, wg in zip(got_grads, want_grads):
        torch.testing.assert_close(gg, wg, rtol=1e-12, atol=1e-12)


def tiny_model(dtype=torch.float64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).to(dtype)


def lora_pair(dropout=0.0, dtype=torch.float64):
    """The same LoRA model twice: fused (apply_lora's default) and with PEFT's own forward restored."""
    from peft.tuners.lora.layer import Linear

    fused = apply_lora(tiny_model(dtype), r=4, alpha=8, dropout=dropout, target_modules=TARGETS)
    plain = apply_lora(tiny_model(dtype), r=4, alpha=8, dropout=dropout, target_modules=TARGETS)
    plain.load_state_dict(fused.state_dict())
    for m in plain.modules():
        if isinstance(m, Linear):
            m.__class__ = Linear
    with torch.no_grad():  # B starts at zero; make the update non-zero so the test can see it
        for (n, p), q in zip(fused.named_parameters(), plain.parameters()):
            if "lora_B" in n:
                p.normal_(0, 0.1)
                q.copy_(p)
    return fused, plain


def loss_and_grads(model, ids):
    loss = model(input_ids=ids, labels=ids).loss
    params = [p for p in model.parameters() if p.requires_grad]
    return loss, torch.autograd.grad(loss, params)


def test_apply_lora_fuses_every_target_and_matches_peft():
    fused, plain = lora_pair()
    from peft.tuners.lora.layer import Linear

    n = sum(type(m) is not Linear and isinstance(m, Linear) for m in fused.modules())
    assert n == 2 * len(TARGETS)
    ids = torch.randint(0, 97, (2, 160), generator=torch.Generator().manual_seed(1))  # 320 rows: merged path
    (lf, gf), (lp, gp) = loss_and_grads(fused, ids), loss_and_grads(plain, ids)
    torch.testing.assert_close(lf, lp, rtol=1e-10, atol=1e-10)
    assert len(gf) == len(gp) == 4 * len(TARGETS)
    for a, b in zip(gf, gp):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    # PEFT's switches still work: adapters off is the base model, and the fused forward did use the adapter.
    with fused.disable_adapter():
        base = fused(input_ids=ids).logits
    assert not torch.allclose(base, fused(input_ids=ids).logits)
    with plain.disable_adapter():
        torch.testing.assert_close(base, plain(input_ids=ids).logits)


def test_dropout_and_bf16_fall_back_to_peft(monkeypatch):
    import posttrain.models.lora as lora

    calls = []
    monkeypatch.setattr(lora, "lora_linear", lambda *a: calls.append(1))
    ids = torch.randint(0, 97, (1, 300))
    for model in (lora_pair(dropout=0.1)[0], lora_pair(dtype=torch.bfloat16)[0]):
        model(input_ids=ids)
    assert calls == []


def test_fuse_is_idempotent_and_merge_still_works():
    fused, plain = lora_pair()
    assert fuse_lora_forward(fused) == 0  # already fused: nothing left to swap
    ids = torch.randint(0, 97, (1, 40))
    want = plain(input_ids=ids).logits
    torch.testing.assert_close(fused.merge_and_unload()(input_ids=ids).logits, want, rtol=1e-9, atol=1e-9)
