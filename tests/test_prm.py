"""Process reward models: the per-step BCE by hand, the label contract's refusals, the step-end tokens, the held-out
metrics by hand, and a tiny `posttrain prm` run scored back through load_prm."""

import copy
import json
import math

import pytest
import torch

from posttrain.config import PRMSection, load_config
from posttrain.data import StepExample, build_steps, collate_steps, render_steps, row_to_steps
from posttrain.errors import DataError
from posttrain.losses import NEUTRAL_TARGETS, counted_steps, step_bce
from posttrain.methods.prm import ProcessBCE, auroc, auroc_se, first_error, hard_label, harmonic_mean, step_accuracy
from tests.helpers import prm_solution_rows, write_jsonl

LN2 = math.log(2)
NAN = math.nan


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# --- the loss ---------------------------------------------------------------------------------------------------

def test_step_bce_hard_and_soft_labels_by_hand():
    z = torch.tensor([0.0, 2.0, 2.0, 1.0, -1.0])
    y = torch.tensor([1.0, 1.0, 0.0, 0.7, 0.25])
    loss, counted = step_bce(z, y)
    # -(y log s(z) + (1-y) log(1-s(z))) = y softplus(-z) + (1-y) softplus(z)
    want = [LN2, softplus(-2), softplus(2), 0.7 * softplus(-1) + 0.3 * softplus(1),
            0.25 * softplus(1) + 0.75 * softplus(-1)]
    assert loss.tolist() == pytest.approx(want, abs=1e-6)
    assert want[1] == pytest.approx(0.126928, abs=1e-6) and want[3] == pytest.approx(0.613262, abs=1e-6)
    assert counted.all()


@pytest.mark.parametrize("neutral,target", [("skip", None), ("positive", 1.0), ("negative", 0.0)])
def test_neutral_steps_skipped_or_counted_as_a_side(neutral, target):
    z = torch.tensor([1.0, 1.0, -2.0])
    y = torch.tensor([NAN, 0.0, NAN])
    loss, counted = step_bce(z, y, neutral)
    if target is None:
        assert counted.tolist() == [False, True, False]
        assert loss.tolist() == pytest.approx([0.0, softplus(1), 0.0], abs=1e-6)
    elif target == 1.0:
        assert counted.all() and loss.tolist() == pytest.approx([softplus(-1), softplus(1), softplus(2)], abs=1e-6)
    else:
        assert counted.all() and loss.tolist() == pytest.approx([softplus(1), softplus(1), softplus(-2)], abs=1e-6)
    assert counted_steps(y, neutral).tolist() == counted.tolist()
    assert not torch.isnan(loss).any()


def test_a_zero_head_starts_at_ln2_for_any_label_and_the_config_offers_the_neutral_table():
    y = torch.tensor([1.0, 0.0, 0.3, NAN])
    for neutral in NEUTRAL_TARGETS:
        loss, counted = step_bce(torch.zeros(4), y, neutral)
        assert float(loss.sum() / counted.sum()) == pytest.approx(LN2, abs=1e-7)
    assert set(PRMSection.model_fields["neutral"].annotation.__args__) == set(NEUTRAL_TARGETS)


# --- the label contract -----------------------------------------------------------------------------------------

def _row(**kw):
    return {"prompt": "What is 2+3?", "steps": ["2+3 = 5.", "So 5."], "labels": [1, 0], **kw}


def test_labels_parse_to_floats_and_neutral():
    prompt, steps, labels = row_to_steps(_row(labels=[True, 0.25], answer="5", provenance={"k": 1}), "f.jsonl", 4)
    assert prompt == [{"role": "user", "content": "What is 2+3?"}] and steps == ["2+3 = 5.", "So 5."]
    assert labels == [1.0, 0.25]
    assert row_to_steps(_row(labels=[False, None]), "f.jsonl", 4)[2] == [0.0, None]
    assert row_to_steps(_row(labels=[1.0, 0]), "f.jsonl", 4, system_prompt="Be exact.")[0][0] == \
        {"role": "system", "content": "Be exact."}


@pytest.mark.parametrize("change,field,words", [
    ({"steps": ["a.", "b.", "c."], "labels": [1, 1, -1]}, "labels[2]", "PRM800K's ratings map +1 -> 1, 0 -> null"),
    ({"labels": [1, 2]}, "labels[1]", "got 2"),
    ({"labels": [1.5, 1]}, "labels[0]", "probability in [0, 1]"),
    ({"labels": ["yes", 1]}, "labels[0]", "got 'yes'"),
    ({"labels": [float("nan"), 1]}, "labels[0]", "got nan"),
    ({"labels": [1]}, "labels", "1 labels for 2 steps"),
    ({"labels": None}, "labels", "one label per step"),
    ({"steps": []}, "steps", "non-empty list"),
    ({"steps": ["a.", "  "]}, "steps[1]", "non-empty text"),
    ({"steps": ["a.", 3]}, "steps[1]", "non-empty text"),
    ({"prompt": None}, "prompt", "missing field"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "prompt[2].role",
     "expected 'user', got 'assistant'"),  # a prompt with the answer in it
])
def test_bad_rows_name_file_row_and_field(change, field, words):
    with pytest.raises(DataError) as err:
        row_to_steps({**_row(), **change}, "labels.jsonl", 7)
    assert err.value.file == "labels.jsonl" and err.value.row == 7 and err.value.field == field
    assert words in str(err.value) and "labels.jsonl, row 7" in str(err.value)


def test_a_bad_row_stops_the_build_with_its_line_number(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "l.jsonl", [_row(), _row(labels=[1, -1])])
    with pytest.raises(DataError, match=r"l.jsonl, row 2, field 'labels\[1\]': -1 is not a label"):
        build_steps(path, tokenizer, max_seq_len=256)


# --- the step-end tokens ----------------------------------------------------------------------------------------

STEPS = ["First, 2+3 = 5.", "Then 5 * 4 = 20 ", "Ünïcode ends in 🙂", "So the answer is 20"]


def _check_ends(tok, ids, ends, steps, sep):
    """Checked by decoding, independently of the offsets: the tokens up to a step's end token spell the text up
    to the step's last character, plus at most part of the separator (never the next step); the tokens before it
    stop short of that character."""
    text = tok.decode(ids)
    assert ends == sorted(set(ends)) and ends[-1] == len(ids) - 1
    at = text.rindex(sep.join(steps))
    for i, e in enumerate(ends):
        upto = at + len(sep.join(steps[:i + 1]))
        through = tok.decode(ids[:e + 1])
        assert through.startswith(text[:upto]) and sep.startswith(through[upto:])
        assert len(tok.decode(ids[:e])) < upto


@pytest.fixture(scope="module")
def plain_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    return tok


def test_step_ends_on_the_embedded_tokenizer_with_its_chat_template(tokenizer):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Compute 2+3, times 4."}]
    ids, ends = render_steps(tokenizer, prompt, STEPS)
    _check_ends(tokenizer, ids, ends, STEPS, "\n")
    assert [tokenizer.decode(ids[e]) for e in ends] == [".", " ", " 🙂", "0"]
    assert "<|im_start|>assistant\nFirst" in tokenizer.decode(ids)
    ids2, ends2 = render_steps(tokenizer, prompt, STEPS, separator="\n\n")
    _check_ends(tokenizer, ids2, ends2, STEPS, "\n\n")


def test_step_ends_without_a_template_and_with_a_config_template(tokenizer, plain_tokenizer):
    prompt = [{"role": "user", "content": "Q: 2+3?"}]
    ids, ends = render_steps(plain_tokenizer, prompt, STEPS, separator=" | ")
    assert plain_tokenizer.decode(ids).startswith("Q: 2+3?First")
    _check_ends(plain_tokenizer, ids, ends, STEPS, " | ")
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    steps = ["x = 1.", "y = 2."]
    ids, ends = render_steps(tokenizer, prompt, steps, chat_template=template)
    _check_ends(tokenizer, ids, ends, steps, "\n")
    with pytest.raises(Exception, match="does not hold the joined steps verbatim"):
        render_steps(tokenizer, prompt, [" x = 1.", "y = 2."], chat_template=template)  # trimmed away


def test_two_steps_in_one_token_are_refused_with_the_row(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "l.jsonl", [_row(), _row(steps=["hel", "lo"], labels=[1, 1])])
    with pytest.raises(DataError, match=r"row 2, field 'steps\[0\]': steps 0 and 1 meet inside one token \('hello'\)"):
        build_steps(path, tokenizer, separator="", max_seq_len=256)


def test_overlong_rows_error_truncate_or_drop_and_are_counted(tokenizer, tmp_path):
    long = _row(steps=[f"step {i} is fine." for i in range(12)], labels=[1] * 11 + [0])
    path = write_jsonl(tmp_path / "l.jsonl", [_row(), long])
    full, _ = build_steps(path, tokenizer, max_seq_len=512)
    cap = full[1].step_ends[5] + 1  # steps 0..5 of row 2 fit exactly
    with pytest.raises(DataError, match=r"row 2: \d+ tokens to the last step's end, more than data.max_seq_len"):
        build_steps(path, tokenizer, max_seq_len=cap)
    cut, report = build_steps(path, tokenizer, max_seq_len=cap, overlong="truncate")
    assert cut[1].step_ends == full[1].step_ends[:6] and cut[1].labels == [1.0] * 6 and len(cut[1]) == cap
    assert "1 rows cut at max_seq_len, 6 of their steps left out (rows 2)" in report.summary()
    kept, report = build_steps(path, tokenizer, max_seq_len=cap, overlong="drop")
    assert [e.row for e in kept] == [1] and "1 rows dropped as over-long" in report.summary()
    assert "2 rows, 1 kept, 2 steps (1 correct, 1 incorrect, 0 soft, 0 neutral)" in report.summary()


def test_collate_reads_every_step_at_its_place_in_packed_rows(tokenizer):
    exs = [StepExample([5, 6, 7, 8], [1, 3], [1.0, None]), StepExample([9, 10, 11], [2], [0.25]),
           StepExample([12, 13], [0, 1], [0.0, 1.0])]
    b = collate_steps([exs[:2], exs[2:]], pad_id=0)
    assert b["input_ids"].shape == (2, 7)
    flat = b["input_ids"].reshape(-1)
    assert flat[b["step_index"]].tolist() == [6, 8, 11, 12, 13]
    assert b["step_example"].tolist() == [0, 0, 1, 2, 2]
    assert b["step_label"].tolist()[2:] == [0.25, 0.0, 1.0] and math.isnan(b["step_label"][1])
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 2] and int(b["num_tokens"]) == 9
    # the loss unit is a counted step: the neutral one is out under skip, in otherwise
    assert ProcessBCE("skip").count(b) == 4 and ProcessBCE("negative").count(b) == 5


# --- held-out metrics by hand -----------------------------------------------------------------------------------

def test_auroc_with_ties_and_its_standard_error_by_hand():
    assert auroc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == pytest.approx(0.75)
    # good 0.5 vs bad 0.2: 1, vs bad 0.5: a tie, 1/2; good 0.9 beats both: (1 + 0.5 + 1 + 1) / 4
    assert auroc([0.2, 0.5, 0.5, 0.9], [False, True, False, True]) == pytest.approx(0.875)
    assert auroc([0.5] * 4, [True, False, True, False]) == 0.5
    assert math.isnan(auroc([0.3, 0.7], [True, True]))
    # A = 0.75, 2 and 2: Q1 = 0.6, Q2 = 9/14; (0.1875 + 0.0375 + 0.080357) / 4 = 0.076339
    assert auroc_se(0.75, 2, 2) == pytest.approx(math.sqrt(0.076339), abs=1e-5)
    # A = 0.5, 50 and 50: Q1 = Q2 = 1/3; (0.25 + 2 * 49 / 12) / 2500 = 0.0033667
    assert auroc_se(0.5, 50, 50) == pytest.approx(0.058023, abs=1e-6)


def test_step_accuracy_hard_labels_and_first_error_by_hand():
    assert [hard_label(x) for x in (1.0, 0.0, 0.7, 0.3, 0.5, NAN)] == [True, False, True, False, None, None]
    assert step_accuracy([0.9, 0.2, 0.5, 0.6, 0.1], [True, True, False, None, False]) == pytest.approx(2.5 / 4)
    probs = [[0.9, 0.3, 0.2], [0.9, 0.8, 0.1], [0.7, 0.6], [0.7, 0.4], [0.6, 0.6]]
    hard = [[True, False, False], [True, False, None], [True, True], [True, None], [None, None]]
    # with an error: rows 1 (first predicted-bad step 1 = first bad step 1) and 2 (predicted 2, labelled 1)
    # without: rows 3 and 5 have no predicted-bad step, row 4 flags its neutral step 1
    fe, ok = first_error(probs, hard)
    assert fe == pytest.approx(0.5) and ok == pytest.approx(2 / 3)
    assert harmonic_mean(0.5, 2 / 3) == pytest.approx(4 / 7) and harmonic_mean(0.0, 0.0) == 0.0
    assert math.isnan(harmonic_mean(NAN, 1.0)) and all(map(math.isnan, first_error([], [])))


# --- a tiny run, end to end ---------------------------------------------------------------------------------------

def test_run_prm_end_to_end_then_load_and_score(tiny_dir, tmp_path):
    from posttrain.recipes import RECIPES
    from posttrain.rewards import load_prm

    path = write_jsonl(tmp_path / "labels.jsonl", prm_solution_rows(24))
    out = tmp_path / "prm"
    cfg = load_config(None, [f"model.name={tiny_dir}", f"data.train={path}", f"output_dir={out}",
                             "train.max_steps=10", "train.lr=5e-3", "data.eval_fraction=0.25",
                             "train.micro_batch_size=4", "train.warmup_ratio=0.0", "data.max_seq_len=160"],
                      method="prm")
    summary = RECIPES["prm"].run(cfg)
    assert {"adapter", "score_head.safetensors", "config.yaml", "summary.json", "report.html"} <= \
        {p.name for p in out.iterdir()}
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    first_step = next(m for m in metrics if "loss" in m and "lr" in m)
    assert first_step["loss"] == pytest.approx(LN2, abs=1e-6)  # zero-initialised head: p = 0.5 everywhere
    before, after = summary["eval_before"], summary["eval_after"]
    assert before["eval/loss"] == pytest.approx(LN2, abs=1e-6) and before["eval/auroc"] == 0.5
    assert before["eval/step_accuracy"] == 0.5 and before["eval/first_error_accuracy"] == 0.0
    assert after["eval/loss"] < before["eval/loss"] and after["eval/auroc"] > 0.5
    assert after["eval/auroc_se"] >= 0 and {"eval/auroc_z", "eval/first_error_f1", "eval/p_good"} <= set(after)

    again = RECIPES["prm"].evaluate_run(cfg, out)  # what `posttrain eval RUN` prints
    assert again["eval/auroc"] == pytest.approx(after["eval/auroc"]) and again["solutions"] == 6
    prm = load_prm(out)
    prompts = ["What is (1 + 2) * 2?", [{"role": "user", "content": "What is (3 + 2) * 2?"}]]
    scores = prm.score_steps(prompts, [["1 + 2 = 3.", "3 * 2 = 7!"], ["3 + 2 = 5.", "5 * 2 = 10.", "So 10."]],
                             batch_size=1)
    assert [len(s) for s in scores] == [2, 3] and all(0 < p < 1 for s in scores for p in s)
    assert scores[0][1] < scores[1][1]  # the '!' step scores lower
    batched = prm.score_steps(prompts, [["1 + 2 = 3.", "3 * 2 = 7!"], ["3 + 2 = 5.", "5 * 2 = 10.", "So 10."]])
    assert batched == [pytest.approx(s, abs=1e-5) for s in scores]
    with pytest.raises(DataError, match=r"score_steps, row 2, field 'steps\[0\]'"):
        prm.score_steps(prompts, [["ok."], [""]])
    with pytest.raises(ValueError, match="is a prm run, not a reward-model run; load it with .*load_prm"):
        from posttrain.rewards import load_reward

        load_reward(str(out))
    from posttrain.errors import ConfigError
    from posttrain.ship import merge_run

    with pytest.raises(ConfigError, match="is a prm model .*it scores, it does not generate"):
        merge_run(str(out), str(tmp_path / "merged"))
