"""Preference data (formats, validation, response-only masks) and the DPO method (one forward, references)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.config import load_config
from posttrain.data import build_pairs, collate_pairs, pair_batches, parse_hh, row_to_pair
from posttrain.errors import DataError
from posttrain.methods import PreferenceMethod, precompute_reference
from posttrain.models import apply_lora
from posttrain.models.attention import branch_segments
from posttrain.models.attention import register as register_packed_attention
from posttrain.models.forward import sequence_logps
from posttrain.models.reference import AdapterOffReference, FrozenCopyReference
from posttrain.recipes.dpo import run as run_dpo
from tests.helpers import pair_rows, preference_params, write_jsonl

HH = {"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Name a colour.\n\nAssistant: Blue.",
      "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Name a colour.\n\nAssistant: I won't."}



def test_hh_text_splits_into_the_common_prompt_and_last_turns():
    assert parse_hh(HH["chosen"], "f", 1, "chosen")[1] == {"role": "assistant", "content": "Hello!"}
    prompt, chosen, rejected = row_to_pair(HH, "f", 1)
    assert [m["role"] for m in prompt] == ["user", "assistant", "user"]
    assert chosen == [{"role": "assistant", "content": "Blue."}]
    assert rejected == [{"role": "assistant", "content": "I won't."}]


def test_prompt_formats_text_and_messages():
    p, c, r = row_to_pair({"prompt": "Q?", "chosen": "yes", "rejected": "no"}, "f", 1)
    assert p == [{"role": "user", "content": "Q?"}] and c[0]["content"] == "yes"
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    p, c, r = row_to_pair({"prompt": msgs, "chosen": [{"role": "assistant", "content": "d"}],
                           "rejected": [{"role": "assistant", "content": "e"}]}, "f", 1)
    assert p == msgs and r[0]["content"] == "e"


@pytest.mark.parametrize("row,field,problem", [
    ({"prompt": "Q", "rejected": "no"}, "chosen", "missing field"),
    ({"prompt": "Q", "chosen": "same", "rejected": "same "}, "rejected", "identical to chosen"),
    ({"prompt": "Q", "chosen": "yes", "rejected": "  "}, "rejected", "empty response"),
    ({"prompt": 3, "chosen": "yes", "rejected": "no"}, "prompt", "expected text or a list"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: OTHER\n\nAssistant: c"}, "rejected",
     "do not share"),
    ({"chosen": "no markers here", "rejected": "x"}, "chosen", "not in the HH format"),
    ({"prompt": [{"role": "assistant", "content": "a"}], "chosen": "b", "rejected": "c"}, "prompt+chosen[0].role",
     "wrong role order"),
])
def test_bad_pairs_name_file_row_and_field(tmp_path, tokenizer, row, field, problem):
    path = write_jsonl(tmp_path / "p.jsonl", [pair_rows(1)[0], row])
    with pytest.raises(DataError) as err:
        build_pairs(path, tokenizer, max_seq_len=256)
    assert (err.value.row, err.value.field) == (2, field) and problem in str(err.value) and path in str(err.value)


def test_bad_pairs_can_be_counted_and_dropped(tmp_path, tokenizer):
    rows = [*pair_rows(3), {"prompt": "Q", "chosen": "same", "rejected": "same"}, {"prompt": "Q", "rejected": "x"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows[:4])
    pairs, report = build_pairs(path, tokenizer, max_seq_len=256, bad_pairs="drop")
    assert len(pairs) == 3 and report.bad == [(4, "identical to chosen: the pair carries no preference")]
    assert "1 bad pairs dropped (row 4" in report.summary()
    with pytest.raises(DataError, match="missing field"):  # a malformed row is never droppable
        build_pairs(write_jsonl(tmp_path / "q.jsonl", rows), tokenizer, max_seq_len=256, bad_pairs="drop")


def test_only_the_final_response_is_scored(tokenizer):
    path_rows = [HH]
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        pairs, _ = build_pairs(write_jsonl(Path(d) / "hh.jsonl", path_rows), tokenizer, max_seq_len=256)
    for ex, text in ((pairs[0].chosen, "Blue."), (pairs[0].rejected, "I won't.")):
        trained = tokenizer.decode([t for t, on in zip(ex.input_ids, ex.trained) if on])
        assert trained == text + "<|im_end|>"  # not "Hello!", the earlier assistant turn in the prompt


def test_overlong_pairs_follow_the_policy(tmp_path, tokenizer):
    rows = pair_rows(3)
    rows[1]["rejected"] = "word " * 300
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(DataError, match="row 2.*max_seq_len"):
        build_pairs(path, tokenizer, max_seq_len=64)
    pairs, report = build_pairs(path, tokenizer, max_seq_len=64, overlong="drop")
    assert len(pairs) == 2 and report.dropped_overlong == [2]
    pairs, report = build_pairs(path, tokenizer, max_seq_len=64, overlong="truncate")
    assert len(pairs) == 3 and report.truncated == [2] and len(pairs[1].rejected) == 64


@pytest.fixture()
def pairs(tmp_path, tokenizer):
    return build_pairs(write_jsonl(tmp_path / "p.jsonl", pair_rows(6)), tokenizer, max_seq_len=128)[0]


@pytest.mark.parametrize("attn", ["sdpa_packed", "sdpa"])
def test_one_packed_forward_equals_each_sequence_alone(tiny_dir, pairs, tokenizer, attn):
    register_packed_attention()
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64, attn_implementation=attn)
    packed = collate_pairs([pairs[:3], pairs[3:]], tokenizer.pad_token_id)
    logp, n = sequence_logps(model, packed)
    alone = []
    for p in pairs:
        for ex in (p.chosen, p.rejected):
            ids = torch.tensor([ex.input_ids])
            logits = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
            mask = torch.tensor(ex.trained[1:])
            alone.append(logits[mask].gather(1, ids[0, 1:][mask][:, None]).sum())
    assert torch.allclose(logp, torch.stack(alone), atol=1e-9)
    assert n.tolist() == [sum(ex.trained[1:]) for p in pairs for ex in (p.chosen, p.rejected)]


@pytest.mark.parametrize("attn", ["sdpa_packed", "sdpa", "eager"])
def test_shared_prompt_equals_separate_sequences_in_loss_and_gradients(tiny_dir, tmp_path, tokenizer, attn,
                                                                     monkeypatch):
    register_packed_attention()
    if attn == "sdpa_packed":  # each sequence attended on its own: the (T x T) mask is never built
        import posttrain.models.forward as forward

        monkeypatch.setattr(forward, "pair_attention_mask", lambda *a: pytest.fail("mask built"))
    rows = pair_rows(4) + [HH, {**HH, "rejected": HH["rejected"].replace("I won't.", "Green, or maybe red.")}]
    pairs = build_pairs(write_jsonl(tmp_path / "p.jsonl", rows), tokenizer, max_seq_len=128)[0]
    torch.manual_seed(0)
    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation=attn),
                       r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    method = PreferenceMethod("dpo", preference_params(beta=0.5), AdapterOffReference())
    results = []
    for share in (False, True):
        batch = collate_pairs([pairs[:2], pairs[2:5], pairs[5:]], tokenizer.pad_token_id, share_prompt=share)
        loss, terms = method.pair_terms(model, batch)
        loss.sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        model.zero_grad()
        results.append((loss, terms["logps/chosen"], terms["logps/rejected"], grads, int(batch["num_tokens"])))
    (l0, c0, r0, g0, n0), (l1, c1, r1, g1, n1) = results
    assert torch.allclose(l0, l1, atol=1e-5) and torch.allclose(c0, c1, atol=1e-4) and torch.allclose(r0, r1, atol=1e-4)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g0, g1))
    assert n1 < n0  # every prompt went through the model once, not twice


def test_lora_reference_by_disabling_equals_a_frozen_copy(tiny_dir, pairs, tokenizer):
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    frozen = FrozenCopyReference(base)
    model = apply_lora(base, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    with torch.no_grad():  # move the policy away from the reference
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    batch = collate_pairs([[p] for p in pairs], tokenizer.pad_token_id)
    off = AdapterOffReference()(model, batch)
    assert torch.allclose(off, frozen(model, batch), atol=1e-5)
    assert not torch.allclose(off, sequence_logps(model, batch)[0], atol=1e-3)  # the policy itself differs


def test_precomputed_reference_gives_the_live_losses(tiny_dir, pairs, tokenizer, tmp_path):
    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32), r=4, alpha=8,
                       dropout=0.0, target_modules="all-linear")
    live = AdapterOffReference()
    table = precompute_reference(live, model, pair_batches(pairs, 4, tokenizer.pad_token_id), len(pairs),
                                 tmp_path / "ref.pt")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    batch = collate_pairs([pairs[4:], pairs[:2]], tokenizer.pad_token_id)  # another order and packing
    params = preference_params(beta=0.1)
    a, _ = PreferenceMethod("dpo", params, live).pair_terms(model, batch)
    b, _ = PreferenceMethod("dpo", params, table).pair_terms(model, batch)
    assert torch.allclose(a, b, atol=1e-5)
    again = precompute_reference(None, model, pair_batches(pairs, 4, tokenizer.pad_token_id), len(pairs),
                                 tmp_path / "ref.pt")  # same data: read from disk, the reference is not run
    assert torch.equal(again.table, table.table)


def test_dpo_step_raises_chosen_and_lowers_rejected(tiny_dir, pairs, tokenizer):
    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32), r=4, alpha=8,
                       dropout=0.0, target_modules="all-linear")
    method = PreferenceMethod("dpo", preference_params(beta=0.5), AdapterOffReference())
    batch = collate_pairs([[p] for p in pairs], tokenizer.pad_token_id)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss, metrics = method.loss_sum(model, batch)
    assert loss.item() / len(pairs) == pytest.approx(0.6931, abs=1e-4)  # policy == reference at LoRA init
    for _ in range(5):
        loss, _ = method.loss_sum(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
    _, terms = method.pair_terms(model, batch)
    assert float(terms["rewards/chosen"].mean()) > 0 > float(terms["rewards/rejected"].mean())
    assert float(terms["accuracy"].mean()) == 1.0


@pytest.mark.parametrize("loss,finetune,precompute", [("dpo", "lora", False), ("dpo", "full", True),
                                                      ("simpo", "lora", False), ("ipo", "full", False)])
def test_run_dpo_end_to_end(tiny_dir, tmp_path, loss, finetune, precompute):
    path = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(20))
    cfg = load_config(None, [f"model.name={tiny_dir}", f"data.train={path}", f"output_dir={tmp_path / 'run'}",
                             f"finetune={finetune}", f"dpo.loss={loss}", f"dpo.precompute_ref={precompute}",
                             "train.max_steps=4", "train.lr=1e-3", "data.eval_fraction=0.2"], method="dpo")
    summary = run_dpo(cfg)
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["step"] == 0 and "eval/accuracy" in metrics[0]
    step = next(m for m in metrics if "loss" in m)
    assert {"rewards/chosen", "rewards/rejected", "rewards/margin", "accuracy", "logps/chosen",
            "logps/rejected"} <= set(step)
    if loss != "simpo":
        assert {"logps/ref_chosen", "logps/ref_rejected", "kl_to_ref"} <= set(step)
        assert metrics[0]["eval/loss"] == pytest.approx(0.6931 if loss == "dpo" else 25.0, abs=1e-3)
        assert metrics[0]["eval/accuracy"] == 0.5  # policy == reference: every pair a tie, counted as chance
    assert summary["eval_after"]["step"] == 4
    out = tmp_path / "run" / ("adapter" if finetune == "lora" else "model")
    assert out.is_dir() and (tmp_path / "run" / "reference-train.pt").exists() == precompute
    if loss == "dpo":  # `posttrain eval RUN` rebuilds the reference and gives the run's own final numbers
        from posttrain.recipes import RECIPES

        again = RECIPES[cfg.method].evaluate_run(cfg, tmp_path / "run")
        for key in ("eval/loss", "eval/accuracy", "eval/rewards/margin"):
            assert again[key] == pytest.approx(summary["eval_after"][key], abs=1e-4)


def test_dpo_config_example_validates_and_wrong_command_is_clear(tmp_path):
    from posttrain.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: dpo\ndata: {train: x.jsonl}\n")
    assert main(["sft", str(cfg)]) == 2


def test_unpacked_micro_batch_is_laid_out_without_padding(tiny_dir, pairs, tokenizer):
    from posttrain.data import pair_schedule

    plan = pair_schedule(pairs, micro_batch_size=3, grad_accum=1, seed=0, pad_id=tokenizer.pad_token_id,
                         packing=False, max_seq_len=128)
    (batch,) = plan.step(0)
    units = [plan.unit(k) for k in range(3)]
    padded = collate_pairs(units, tokenizer.pad_token_id)  # one pair per row, padded to the longest
    assert sorted(batch["pair_index"].tolist()) == sorted(padded["pair_index"].tolist())
    assert batch["input_ids"].numel() == int(batch["num_tokens"]) < padded["input_ids"].numel()
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64, attn_implementation="sdpa")
    by_pair = {}
    for b in (batch, padded):
        logp, _ = sequence_logps(model, b)
        by_pair[id(b)] = dict(zip(b["pair_index"].tolist(), logp.view(-1, 2).tolist()))
    assert by_pair[id(batch)].keys() == by_pair[id(padded)].keys()
    for k, v in by_pair[id(batch)].items():
        assert v == pytest.approx(by_pair[id(padded)][k], abs=1e-9)


def test_branch_segments_read_the_pair_layout():
    # block 0: prompt 3 | chosen 2 | rejected 1; block 1: two independent segments; block 2: padding
    branch = torch.tensor([[0, 0, 0, 1, 1, 2, 1, 1, 2, 3, 3]])
    block = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1, 2, 3, 3]])
    assert branch_segments(branch, block) == [[(3, [2, 1]), (0, [2]), (0, [1]), (0, [2])]]
    bad = torch.tensor([[0, 1, 2, 1]])  # a branch cut in two: not a layout the attention can split
    assert branch_segments(bad, torch.zeros_like(bad)) is None
