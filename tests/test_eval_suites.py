import io
import math
import sys
import types

import pytest
import torch

from posttrain.data import build_examples, build_pairs, eval_batches
from posttrain.errors import DataError
from posttrain.eval import Rule, check_gate, gate_table, generation, heldout_loss
from posttrain.eval.generation import abstains
from posttrain.eval.likelihood import expected_calibration_error
from posttrain.eval.scorers import SCORERS
from posttrain.eval.suites import run_suite
from tests.helpers import chat_rows, write_jsonl


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)


# --- expected calibration error, worked by hand ---

def test_ece_by_hand():
    # bins of width 0.1, left-closed: 0.95, 0.92 -> bin 9; 0.65, 0.62 -> bin 6; 0.35 -> bin 3
    # bin 9: acc 1/2 = 0.5, conf (0.95 + 0.92) / 2 = 0.935, |0.5 - 0.935| = 0.435, weight 2/5 -> 0.174
    # bin 6: acc 2/2 = 1.0, conf (0.65 + 0.62) / 2 = 0.635, |1 - 0.635| = 0.365, weight 2/5 -> 0.146
    # bin 3: acc 0/1 = 0.0, conf 0.35, 0.35, weight 1/5 -> 0.070
    # ECE = 0.174 + 0.146 + 0.070 = 0.390
    ece = expected_calibration_error([0.95, 0.92, 0.65, 0.62, 0.35], [True, False, True, True, False])
    assert ece == pytest.approx(0.390, abs=1e-12)


def test_ece_calibrated_is_zero_and_edges():
    assert expected_calibration_error([0.8] * 10, [True] * 8 + [False] * 2) == pytest.approx(0.0, abs=1e-12)
    assert expected_calibration_error([1.0], [True]) == 0.0       # 1.0 falls in the last bin
    assert expected_calibration_error([1.0], [False]) == 1.0
    # 0.3 opens bin 3 (left-closed), sharing it with 0.35: acc 1/2, conf 0.325 -> |0.5 - 0.325| = 0.175
    # (were 0.3 in bin 2 it would be 0.5 * 0.7 + 0.5 * 0.35 = 0.525)
    assert expected_calibration_error([0.3, 0.35], [True, False]) == pytest.approx(0.175, abs=1e-12)
    # bins=2: [0, 0.5) holds 0.4 (wrong: |0 - 0.4| = 0.4), [0.5, 1] holds 0.6 (right: 0.4): 0.5 * 0.4 + 0.5 * 0.4
    assert expected_calibration_error([0.4, 0.6], [False, True], bins=2) == pytest.approx(0.4, abs=1e-12)
    with pytest.raises(ValueError):
        expected_calibration_error([0.5], [True, False])


# --- scorers ---

@pytest.mark.parametrize("scorer, output, reference, options, score", [
    ("exact", "  Paris\n", "Paris", {}, 1.0),
    ("exact", "paris", "Paris", {}, 0.0),
    ("json_exact", '{"b": 2, "a": 1}', '{"a":1,"b":2}', {}, 1.0),
    ("json_exact", '{"a": 1}', '{"a": 2}', {}, 0.0),
    ("json_exact", "not json", "not json", {}, 0.0),
    ("json_valid", ' [1, 2, {"x": null}] ', "", {}, 1.0),
    ("json_valid", "{'a': 1}", "", {}, 0.0),
    ("regex", "Order #A-123 shipped", "", {"pattern": r"#[A-Z]-\d+"}, 1.0),
    ("regex", "Order shipped", "", {"pattern": r"#[A-Z]-\d+"}, 0.0),
    ("number", "So she makes 9 * 2 = 18 dollars.", "9 * 2 = <<9*2=18>>18\n#### 18", {}, 1.0),
    ("number", "The answer is\n#### 1,000", "#### 1000", {}, 1.0),
    ("number", "#### 17", "blah\n#### 18", {}, 0.0),
    ("number", "no number here", "#### 18", {}, 0.0),
    ("contains", "The capital is PARIS, of course.", "Paris", {}, 1.0),
    ("contains", "The capital is Lyon.", "Paris", {}, 0.0),
])
def test_scorers(scorer, output, reference, options, score):
    assert SCORERS[scorer](output, reference, options) == score


@pytest.mark.parametrize("text, declined", [
    ("I don't know.", True), ("Honestly, I do not know the answer.", True), ("i'm not sure about that", True),
    ("That cannot be determined from the question.", True), ("There is no way to know.", True),
    ("It is not possible to know who will win.", True), ("I don't have access to real-time data.", True),
    ("The outcome is unknown.", True), ("I can't answer that.", True), ("I don\u2019t know", True),
    ("I'm sorry, but as a chatbot I don't have the ability to assist with numbers.", True),
    ("It is impossible to predict the weather that far ahead.", True), ("I am unable to tell.", True),
    ("The capital of France is Paris.", False), ("I know this one: 4.", False), ("Sure! 2 + 2 = 4", False),
])
def test_abstention_patterns(text, declined):
    assert abstains(text) is declined


def test_abstention_custom_pattern():
    assert abstains("N/A", r"^n/a$") and not abstains("I don't know", r"^n/a$")


# --- gates ---

HIB = {"dom/exact": True, "dom/loss": False}


def one_check(rule, base, cand):
    verdict = check_gate("g", [rule], base, cand, HIB)
    assert len(verdict["checks"]) == 1
    return verdict["checks"][0]


def test_gate_min_lift_higher_is_better_at_the_boundary():
    rule = Rule("dom/exact", min_lift=0.05)
    ok = one_check(rule, {"dom/exact": 0.40}, {"dom/exact": 0.45})  # 0.45 - 0.40 is 0.04999... in floats
    assert ok["passed"] and ok["change"] == pytest.approx(0.05) and ok["rule"] == ">= +0.050"
    assert not one_check(rule, {"dom/exact": 0.40}, {"dom/exact": 0.4499})["passed"]
    assert not one_check(rule, {"dom/exact": 0.40}, {"dom/exact": 0.30})["passed"]


def test_gate_loss_is_lower_better():
    rule = Rule("dom/loss", max_regression=0.02)
    worse = one_check(rule, {"dom/loss": 2.00}, {"dom/loss": 2.02})
    assert worse["change"] == pytest.approx(-0.02) and worse["passed"]  # exactly at the allowed regression
    assert worse["rule"] == "no worse than -0.020"
    assert not one_check(rule, {"dom/loss": 2.00}, {"dom/loss": 2.0201})["passed"]
    better = one_check(Rule("dom/loss", min_lift=0.1), {"dom/loss": 2.0}, {"dom/loss": 1.9})
    assert better["change"] == pytest.approx(0.1) and better["passed"]
    assert not one_check(Rule("dom/loss", min_lift=0.1), {"dom/loss": 2.0}, {"dom/loss": 2.1})["passed"]


def test_gate_min_relative_lift():
    rule = Rule("dom/exact", min_relative_lift=0.05)  # 5% of 0.6 = 0.03
    ok = one_check(rule, {"dom/exact": 0.6}, {"dom/exact": 0.63})
    assert ok["passed"] and ok["rule"] == ">= +5.0% of baseline"
    assert not one_check(rule, {"dom/exact": 0.6}, {"dom/exact": 0.6299})["passed"]
    # lower is better: 5% of a loss of 2.0 is 0.1
    assert one_check(Rule("dom/loss", min_relative_lift=0.05), {"dom/loss": 2.0}, {"dom/loss": 1.9})["passed"]
    assert not one_check(Rule("dom/loss", min_relative_lift=0.05), {"dom/loss": 2.0}, {"dom/loss": 1.91})["passed"]


def test_gate_missing_metric_fails_and_says_which_side():
    v = check_gate("sft", [Rule("dom/exact", min_lift=0.0)], {"dom/exact": 0.5}, {}, HIB, candidate_name="sft-run")
    assert not v["passed"] and v["checks"][0]["note"] == "sft-run lacks dom/exact"
    v = check_gate("sft", [Rule("dom/exact", max_regression=1.0)], {}, {"dom/exact": 0.5}, HIB, baseline_name="prod")
    assert not v["passed"] and "prod lacks" in v["checks"][0]["note"]
    v = check_gate("sft", [Rule("x/y", min_lift=0.0)], {"x/y": 1.0}, {"x/y": 2.0}, HIB)
    assert not v["passed"] and "direction" in v["checks"][0]["note"]
    v = check_gate("sft", [Rule("dom/exact", min_lift=0.0)], {"dom/exact": math.nan}, {"dom/exact": 0.5}, HIB)
    assert not v["passed"]


def test_gate_several_thresholds_shape_and_table():
    rules = [Rule("dom/exact", min_lift=0.05, max_regression=0.0), Rule("dom/loss", max_regression=0.02)]
    v = check_gate("after-sft", rules, {"dom/exact": 0.5, "dom/loss": 2.0}, {"dom/exact": 0.52, "dom/loss": 1.99},
                   HIB, baseline_name="base", candidate_name="sft")
    assert set(v) == {"name", "candidate", "baseline", "passed", "checks"}
    assert (v["name"], v["baseline"], v["candidate"], v["passed"]) == ("after-sft", "base", "sft", False)
    assert [c["passed"] for c in v["checks"]] == [False, True, True]
    for c in v["checks"]:
        assert set(c) == {"metric", "baseline", "candidate", "change", "rule", "passed", "note"}
    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=160).print(gate_table(v))
    text = buf.getvalue()
    assert "BLOCKED" in text and "FAIL" in text and "+0.02" in text and "after-sft" in text
    buf = io.StringIO()
    Console(file=buf, width=160).print(gate_table(check_gate("g", rules[1:], {"dom/loss": 2.0}, {"dom/loss": 2.0},
                                                             HIB)))
    assert "PASS" in buf.getvalue()
    with pytest.raises(ValueError, match="no threshold"):
        Rule("dom/exact")
    with pytest.raises(ValueError, match="no rules"):
        check_gate("g", [], {}, {}, HIB)


# --- suites end to end ---

def fake_generate(outputs, seen):
    def gen(model, tokenizer, chats, **kw):
        seen.extend(chats)
        assert not model.training  # suites generate in eval mode
        return list(outputs[:len(chats)])
    return gen


def test_generation_suite_plumbing(tmp_path, tiny, tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / "g.jsonl", [
        {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]},
        {"prompt": "q2", "completion": "a2"},
        {"prompt": "q3", "answer": "a3"},
        {"question": "q4", "answer": "a4"},
    ])
    seen = []
    monkeypatch.setattr(generation, "generate", fake_generate(["a1", " a2 ", "wrong", "a4 and more"], seen))
    tiny.train()
    res = run_suite("generation", tiny, tokenizer, path, options={"scorer": "exact"}, system_prompt="Be brief.")
    assert tiny.training  # the training flag comes back
    assert res.metrics == {"exact": 0.5} and res.higher_is_better == {"exact": True}
    assert res.outputs == ["a1", " a2 ", "wrong", "a4 and more"]
    assert [d["score"] for d in res.details] == [1.0, 1.0, 0.0, 0.0]
    assert [d["reference"] for d in res.details] == ["a1", "a2", "a3", "a4"]
    assert all(c[0] == {"role": "system", "content": "Be brief."} and c[-1]["role"] == "user" for c in seen)
    assert [c[-1]["content"] for c in seen] == ["q1", "q2", "q3", "q4"]

    res = run_suite("generation", tiny, tokenizer, path, options={"scorer": "contains"}, limit=2)
    assert res.metrics == {"contains": 1.0} and len(res.outputs) == 2

    monkeypatch.setattr(generation, "generate", fake_generate(['{"a": 1}', "{bad", '{"b": 2}', "[1]"], []))
    json_path = write_jsonl(tmp_path / "j.jsonl", [{"prompt": f"p{i}", "completion": c}
                                                   for i, c in enumerate(['{"a":1}', '{"a":1}', '{"b":3}', "[1]"])])
    res = run_suite("generation", tiny, tokenizer, json_path, options={"scorer": "json_exact"})
    assert res.metrics == {"json_exact": 0.5, "json_valid": 0.75}
    res = run_suite("generation", tiny, tokenizer, json_path, options={"scorer": "regex", "pattern": r"^\{"})
    assert res.metrics == {"regex": 0.75}


def test_generation_suite_errors(tmp_path, tiny, tokenizer):
    path = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "q1", "completion": "a1"}, {"prompt": "q2"}])
    with pytest.raises(DataError, match=r"g.jsonl, row 2, field 'answer'.*reference"):
        run_suite("generation", tiny, tokenizer, path, options={"scorer": "exact"})
    open_chat = write_jsonl(tmp_path / "o.jsonl", [{"messages": [{"role": "user", "content": "q"}]}])
    with pytest.raises(DataError, match=r"o.jsonl, row 1, field 'messages'.*reference"):
        run_suite("generation", tiny, tokenizer, open_chat, options={"scorer": "exact"})
    bad = write_jsonl(tmp_path / "b.jsonl", [{"text": "q1"}])
    with pytest.raises(DataError, match=r"b.jsonl, row 1, field 'prompt'"):
        run_suite("generation", tiny, tokenizer, bad, options={"scorer": "json_valid"})
    with pytest.raises(ValueError, match="options.pattern"):
        run_suite("generation", tiny, tokenizer, path, options={"scorer": "regex"})
    with pytest.raises(ValueError, match="unknown scorer 'exactly'"):
        run_suite("generation", tiny, tokenizer, path, options={"scorer": "exactly"})
    with pytest.raises(ValueError, match=r"unknown option\(s\) max_tokens"):
        run_suite("generation", tiny, tokenizer, path, options={"max_tokens": 3})
    with pytest.raises(ValueError, match="unknown eval suite 'rouge'"):
        run_suite("rouge", tiny, tokenizer, path)


def test_generation_suite_on_the_tiny_model(tmp_path, tiny, tokenizer):
    path = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "Say hi", "completion": "hi"},
                                              {"prompt": "Name a colour, please", "completion": "red"}])
    res = run_suite("generation", tiny, tokenizer, path, options={"scorer": "exact", "max_new_tokens": 4})
    assert len(res.outputs) == 2 and all(isinstance(o, str) for o in res.outputs)
    assert 0.0 <= res.metrics["exact"] <= 1.0


def test_loss_suite_equals_heldout_loss(tmp_path, tiny, tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", chat_rows(6))
    res = run_suite("loss", tiny, tokenizer, path, system_prompt="You are terse.", batch_size=4)
    examples = build_examples(path, tokenizer, system_prompt="You are terse.", max_seq_len=2048)[0]
    direct = heldout_loss(tiny, eval_batches(examples, 4, tokenizer.pad_token_id))
    assert res.metrics["loss"] == pytest.approx(direct["eval/loss"], rel=1e-6)
    assert res.metrics["ppl"] == pytest.approx(direct["eval/ppl"], rel=1e-6)
    assert res.metrics["tokens"] == direct["eval/tokens"]
    assert res.higher_is_better["loss"] is False and res.higher_is_better["ppl"] is False
    plain = run_suite("loss", tiny, tokenizer, path, batch_size=4)
    assert plain.metrics["loss"] != res.metrics["loss"]  # the system prompt changes what the completion follows


def test_preference_suite_equals_direct_logps(tmp_path, tiny, tokenizer):
    rows = [{"prompt": f"Pick a word for #{i}", "chosen": c, "rejected": r}
            for i, (c, r) in enumerate([("alpha", "beta beta"), ("gamma ok", "delta"), ("sigma", "theta theta ok"),
                                        ("kappa", "omega")])]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    res = run_suite("preference", tiny, tokenizer, path, batch_size=3)

    def logp(ex):  # one plain forward per sequence: the sum of log-probs of its trained tokens
        ids = torch.tensor([ex.input_ids])
        with torch.no_grad():
            logps = torch.log_softmax(tiny(input_ids=ids).logits[0, :-1].double(), -1)
        return sum(float(logps[t - 1, ex.input_ids[t]]) for t in range(1, len(ex)) if ex.trained[t])

    pairs = build_pairs(path, tokenizer, max_seq_len=2048)[0]
    margins = [logp(p.chosen) - logp(p.rejected) for p in pairs]
    assert [d["margin"] for d in res.details] == pytest.approx(margins, abs=1e-3)
    assert 0.0 <= res.metrics["accuracy"] <= 1.0
    assert res.metrics["accuracy"] == sum(m > 0 for m in margins) / len(margins)
    assert res.metrics["margin"] == pytest.approx(sum(margins) / len(margins), abs=1e-3)


def test_multiple_choice_suite(tmp_path, tiny, tokenizer):
    rows = [{"question": "2 + 2?", "choices": ["3", "4", "5"], "answer": 1},
            {"question": "Capital of France?", "choices": ["Paris", "Rome"], "answer": "A"},
            {"question": "Colour of the sky?", "choices": ["green", "blue", "red", "black"], "answer": "b"},
            {"question": "Largest?", "choices": ["1", "10"], "answer": 1}]
    path = write_jsonl(tmp_path / "mc.jsonl", rows)
    res = run_suite("multiple_choice", tiny, tokenizer, path, batch_size=3)
    d = res.details
    assert [len(x["probs"]) for x in d] == [3, 2, 4, 2] and [x["answer"] for x in d] == ["B", "A", "B", "B"]
    for x in d:
        assert sum(x["probs"].values()) == pytest.approx(1.0, abs=1e-9)
        assert x["confidence"] == max(x["probs"].values())
        assert x["correct"] == (x["predicted"] == x["answer"]) and 0.0 < x["letter_mass"] <= 1.0
    conf, correct = [x["confidence"] for x in d], [x["correct"] for x in d]
    assert res.metrics["accuracy"] == sum(correct) / 4
    assert res.metrics["ece"] == pytest.approx(expected_calibration_error(conf, correct), abs=1e-12)
    assert res.metrics["confidence"] == pytest.approx(sum(conf) / 4)
    brier = [sum((p - (k == x["answer"])) ** 2 for k, p in x["probs"].items()) for x in d]
    assert res.metrics["brier"] == pytest.approx(sum(brier) / 4)
    assert res.higher_is_better == {"accuracy": True, "ece": False, "confidence": True, "brier": False}
    # padding in a batch does not change a row's probabilities
    alone = run_suite("multiple_choice", tiny, tokenizer, path, batch_size=1).details
    for a, b in zip(alone, d):
        assert list(a["probs"].values()) == pytest.approx(list(b["probs"].values()), abs=1e-5)

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "choices": ["x", "y"], "answer": "C"}])
    with pytest.raises(DataError, match=r"bad.jsonl, row 1, field 'answer'"):
        run_suite("multiple_choice", tiny, tokenizer, bad)


def test_abstention_suite(tmp_path, tiny, tokenizer, monkeypatch):
    rows = [{"prompt": "Who wins the 2040 election?"}, {"prompt": "What did I eat today?", "answerable": False},
            {"prompt": "What is 2 + 2?", "answerable": True}, {"prompt": "Capital of France?", "answerable": True},
            {"messages": [{"role": "user", "content": "My lottery numbers next week?"}]}]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    outs = ["I don't know.", "You had toast.", "4", "I'm not sure, maybe Paris.", "There is no way to know that."]
    monkeypatch.setattr(generation, "generate", fake_generate(outs, []))
    res = run_suite("abstention", tiny, tokenizer, path)
    assert res.metrics == {"abstention_rate": pytest.approx(2 / 3), "over_abstention": 0.5}
    assert res.higher_is_better == {"abstention_rate": True, "over_abstention": False}
    assert [x["abstained"] for x in res.details] == [True, False, False, True, True]
    res = run_suite("abstention", tiny, tokenizer, path, options={"pattern": "toast"})
    assert res.metrics["abstention_rate"] == pytest.approx(1 / 3) and res.metrics["over_abstention"] == 0.0
    only = write_jsonl(tmp_path / "u.jsonl", rows[:2])
    assert "over_abstention" not in run_suite("abstention", tiny, tokenizer, only).metrics
    bad = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "x", "answerable": "yes"}])
    with pytest.raises(DataError, match=r"row 1, field 'answerable'"):
        run_suite("abstention", tiny, tokenizer, bad)


def test_judge_suite(tmp_path, tiny, tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / "j.jsonl", [{"prompt": f"request {i}"} for i in range(4)])
    monkeypatch.setattr(generation, "generate", fake_generate(["good", "bad", "good", "meh"], []))
    calls = []

    def judge(prompt, first, second, criterion):  # knows good answers, and has no position bias
        calls.append((prompt, first, second, criterion))
        return 0.9 if first == "good" else 0.1 if second == "good" else 0.5

    # (good, bad) -> win; (bad, good) -> loss; (good, x) -> win; (meh, meh) -> tie: (2 + 0.5) / 4
    res = run_suite("judge", tiny, tokenizer, path, judge=judge, reference_outputs=["bad", "good", "x", "meh"],
                    options={"criterion": "Be good."})
    assert res.metrics["win_rate"] == 0.625 and res.metrics["ties"] == 0.25 and res.metrics["inconsistent"] == 0.0
    assert len(calls) == 8 and {c[3] for c in calls} == {"Be good."} and calls[0][0] == "request 0"
    assert calls[0][1:3] == ("good", "bad") and calls[1][1:3] == ("bad", "good")  # both orders
    assert [d["verdict"] for d in res.details] == ["a", "b", "a", "tie"]

    # a judge that always prefers the first slot decides nothing
    res = run_suite("judge", tiny, tokenizer, path, judge=lambda *a: 0.8, reference_outputs=["w", "x", "y", "z"])
    assert res.metrics["inconsistent"] == 1.0 and math.isnan(res.metrics["win_rate"])

    def never(*a):
        raise AssertionError("the baseline is not judged against itself")

    base = run_suite("judge", tiny, tokenizer, path, judge=never)
    assert base.metrics["win_rate"] == 0.5 and base.outputs == ["good", "bad", "good", "meh"]
    with pytest.raises(ValueError, match="4 prompts but 3 reference outputs"):
        run_suite("judge", tiny, tokenizer, path, judge=judge, reference_outputs=["a", "b", "c"])
    with pytest.raises(ValueError, match="needs a judge"):
        run_suite("judge", tiny, tokenizer, path, reference_outputs=["a"] * 4)


def test_lm_eval_suite_missing_and_plumbing(tmp_path, tiny, tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes the import fail even where it is installed
    with pytest.raises(RuntimeError, match=r"lm-eval-harness is not installed \(pip install lm-eval\)"):
        run_suite("lm_eval", tiny, tokenizer, "", options={"tasks": ["arc_easy"]})

    # The call into the harness, against a stand-in with the harness's v0.4 result shape (not the real harness).
    seen = {}
    fake = types.ModuleType("lm_eval")
    hf = types.ModuleType("lm_eval.models.huggingface")
    hf.HFLM = lambda pretrained, tokenizer, batch_size: ("hflm", pretrained, batch_size)

    def simple_evaluate(model, tasks, limit):
        seen.update(model=model, tasks=tasks, limit=limit)
        return {"results": {"arc_easy": {"alias": "arc_easy", "acc,none": 0.25, "acc_stderr,none": 0.01}},
                "higher_is_better": {"arc_easy": {"acc": True}}}

    fake.simple_evaluate = simple_evaluate
    monkeypatch.setitem(sys.modules, "lm_eval", fake)
    monkeypatch.setitem(sys.modules, "lm_eval.models", types.ModuleType("lm_eval.models"))
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", hf)
    res = run_suite("lm_eval", tiny, tokenizer, "", options={"tasks": "arc_easy"}, limit=5, batch_size=2)
    assert res.metrics == {"arc_easy/acc,none": 0.25} and res.higher_is_better == {"arc_easy/acc,none": True}
    assert seen == {"model": ("hflm", tiny, 2), "tasks": ["arc_easy"], "limit": 5}
