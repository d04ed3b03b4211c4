"""Forgetting mitigations in SFT: the KL-to-base term (hand-worked and equal to its plain form), data mixing and
replay at their configured shares."""

import json
import math

import pytest
import torch

from posttrain.config import load_config
from posttrain.data.mixing import mix_counts, sample_rows
from posttrain.errors import ConfigError
from posttrain.losses import linear_kl_sum, token_kl_sum
from posttrain.methods import SFT
from posttrain.methods.sft import completion_loss_sum
from tests.helpers import chat_rows, write_jsonl


def test_token_kl_hand_worked():
    # p = softmax([0, ln 3]) = (1/4, 3/4), q = softmax([0, 0]) = (1/2, 1/2):
    # KL(p || q) = 1/4 ln(1/2) + 3/4 ln(3/2) = -0.173287 + 0.304099 = 0.130812
    logits = torch.tensor([[0.0, math.log(3.0)]])
    ref = torch.zeros(1, 2)
    assert float(token_kl_sum(logits, ref)) == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), abs=1e-7)
    assert float(token_kl_sum(logits, ref)) == pytest.approx(0.130812, abs=1e-6)
    assert float(token_kl_sum(ref, ref)) == 0.0  # KL of a distribution with itself
    # rows add: two copies of the same row give twice the KL
    assert float(token_kl_sum(logits.repeat(2, 1), ref.repeat(2, 1))) == pytest.approx(2 * 0.130812, abs=1e-6)


def test_linear_kl_equals_plain_in_value_and_gradients():
    torch.manual_seed(0)
    h = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    r = torch.randn(7, 5, dtype=torch.float64)
    w = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    plain = token_kl_sum(h @ w.t(), r @ w.t())
    gh, gw = torch.autograd.grad(plain, (h, w))
    chunked = linear_kl_sum(h, r, w, chunk_size=3)  # chunks of 3, 3, 1 rows
    ch, cw = torch.autograd.grad(chunked, (h, w))
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-10)
    assert torch.allclose(ch, gh, atol=1e-10) and torch.allclose(cw, gw, atol=1e-10)


def test_kl_term_is_zero_at_start_and_exact_after_an_update(tiny_dir, tokenizer, tmp_path):
    from posttrain.data import build_examples, eval_batches
    from posttrain.models import apply_lora, load_model

    torch.manual_seed(0)
    model = apply_lora(load_model(tiny_dir, dtype="float32", device="cpu").model, r=4, alpha=8, dropout=0.0,
                       target_modules="all-linear")
    ex = build_examples(write_jsonl(tmp_path / "d.jsonl", chat_rows(4)), tokenizer, max_seq_len=128)[0]
    batch = eval_batches(ex, 4, tokenizer.pad_token_id)[0]
    n = int((batch["labels"][:, 1:] != -100).sum())
    # A fresh LoRA adapter has B = 0: the model equals its base, so the KL is 0 and the loss is plain CE.
    loss, m = SFT(kl_to_base=0.5).loss_sum(model, batch)
    assert m["kl_to_base"] == pytest.approx(0.0, abs=1e-7)
    assert float(loss) == pytest.approx(float(completion_loss_sum(model, batch)), rel=1e-6)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    loss, m = SFT(kl_to_base=0.5).loss_sum(model, batch)
    ce = completion_loss_sum(model, batch)
    # the KL computed from the full logits with the adapter on and off, at the trained positions
    keep = batch["labels"][:, 1:] != -100
    with torch.no_grad():
        on = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[:, :-1][keep]
        with model.disable_adapter():
            off = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[:, :-1][keep]
    kl = float(token_kl_sum(on, off))
    assert kl > 1e-4
    assert m["kl_to_base"] == pytest.approx(kl / n, rel=1e-5)
    assert float(loss) == pytest.approx(float(ce) + 0.5 * kl, rel=1e-5)
    loss.backward()  # the term has gradients into the adapters only
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n_, p in model.named_parameters() if "lora" in n_)


def test_mix_counts_and_draw():
    assert mix_counts(90, [0.1]) == [10]          # 90 / (1 - 0.1) = 100 in all, 10 of them mixed
    assert mix_counts(80, [0.1, 0.1]) == [10, 10]  # 80 / 0.8 = 100
    assert mix_counts(40, []) == []
    with pytest.raises(ValueError):
        mix_counts(10, [0.6, 0.4])
    items = list(range(20))
    a, b = sample_rows(items, 5, seed=1), sample_rows(items, 5, seed=1)
    assert a == b and len(set(a)) == 5 and a == sorted(a)
    assert sample_rows(items, 50, seed=1) == items


def test_config_errors():
    with pytest.raises(ConfigError, match="kl_to_base needs finetune: lora"):
        load_config(None, ["data.train=x.jsonl", "finetune=full", "kl_to_base=0.1"], method="sft")
    with pytest.raises(ConfigError, match="below 1"):
        load_config(None, ["data.train=x.jsonl", "data.mix.path=m.jsonl", "data.mix.ratio=0.6",
                           "data.replay.prompts=p.jsonl", "data.replay.ratio=0.5"], method="sft")


def test_sft_with_mix_replay_and_kl(tiny_dir, tmp_path, monkeypatch):
    import posttrain.recipes.sft
    from posttrain.recipes.sft import run as run_sft

    real_generate, calls = posttrain.recipes.sft.generate, []

    def generate(model, tok, chats, **kw):  # the tiny random model may answer with nothing but special tokens
        calls.append((len(chats), hasattr(model, "disable_adapter")))
        outs = real_generate(model, tok, chats, **kw)
        return [o if k % 2 else "" for k, o in enumerate(f"answer {i}" for i in range(len(outs)))]

    monkeypatch.setattr(posttrain.recipes.sft, "generate", generate)
    train = write_jsonl(tmp_path / "train.jsonl", chat_rows(16))
    general = write_jsonl(tmp_path / "general.jsonl", chat_rows(30, seed=5))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Name a colour (#{i})."}) + "\n" for i in range(10)))
    overrides = [f"model.name={tiny_dir}", f"data.train={train}", "data.eval_fraction=0.25",
                 f"data.mix.path={general}", "data.mix.ratio=0.2", f"data.replay.prompts={prompts}",
                 "data.replay.ratio=0.2", "data.replay.max_new_tokens=8", "kl_to_base=0.1", "lora.r=4",
                 f"output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.micro_batch_size=2", "eval_samples=0"]
    result = run_sft(load_config(None, overrides, method="sft"))
    # 12 task examples (4 held out); each source is 20% of 12 / 0.6 = 20 examples: 4 each
    # of the 4 replayed prompts, the 2 empty answers are skipped and counted, never silently dropped
    lines = "\n".join(result["data"])
    assert calls == [(4, True)]
    assert "mixed in 4 examples" in lines and "replay: 2 empty base answers skipped" in lines
    assert "replayed 2 base-model answers" in lines
    assert "training set: 12 task + 6 mixed = 18 examples (33.3% mixed)" in lines
    replay = [json.loads(x) for x in (tmp_path / "run" / "replay.jsonl").read_text().splitlines()]
    assert [r["messages"][-1]["content"] for r in replay] == ["answer 1", "answer 3"]
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["kl_to_base"] >= 0 for r in recs if "loss" in r) and any("kl_to_base" in r for r in recs)
