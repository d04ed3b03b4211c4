"""Constitutional AI data: the constitution file, both-orders judging against a planted position bias, SL-CAI and
RL-CAI rows (shape, provenance, the project's own SFT and DPO readers), the ``posttrain cai`` command, and one
run on the embedded model.

The synthetic judges below know the truth: every answer has a quality q, and the judge's log-odds that the answer
in slot A is better are ``K * (q_first - q_second) + BIAS``. BIAS is a planted preference for slot A that has
nothing to do with the answers, like the one small LM judges show.
"""

import json
import math
import zlib

import pytest

from posttrain.cli import main
from posttrain.data import build_examples, build_pairs
from posttrain.errors import DataError
from posttrain.judge.cai import read_prompts, rl_cai, sl_cai
from posttrain.judge.constitution import DEFAULT_CONSTITUTION, Principle, load_constitution
from posttrain.judge.pairwise import both_orders
from tests.helpers import write_jsonl

PRINCIPLES = [Principle("kind", "Is it unkind?", "Rewrite it kindly.", "The better answer is kinder."),
              Principle("short", "Is it too long?", "Rewrite it shorter.", "The better answer is shorter.")]
PROMPTS = [f"Tell me about the number {i}." for i in range(8)]


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


class BiasedJudge:
    """P(first better) = sigmoid(K * (q(first) - q(second)) + BIAS); records every call."""

    def __init__(self, quality, k: float, bias: float):
        self.quality, self.k, self.bias, self.calls = quality, k, bias, []

    def __call__(self, prompt, first, second, criterion):
        self.calls.append((prompt, first, second, criterion))
        return sigmoid(self.k * (self.quality(first) - self.quality(second)) + self.bias)


def hashed_quality(text: str) -> float:
    """A stand-in 'true quality' in [0, 1) for text a random model wrote: fixed per text, unrelated to position."""
    return zlib.crc32(text.encode()) / 2 ** 32


# --- both_orders, by hand ----------------------------------------------------------------------------------------


def table_judge(table: dict[tuple[str, str], float]):
    return lambda prompt, first, second, criterion: table[(first, second)]


@pytest.mark.parametrize("a_first, b_first, margin, verdict", [
    (0.8, 0.3, 0.0, "a"),             # p1 = 0.8, p2 = 1 - 0.3 = 0.7: a wins in both orders
    (0.4, 0.9, 0.0, "b"),             # p1 = 0.4, p2 = 1 - 0.9 = 0.1: b wins in both orders
    (0.55, 0.4, 0.1, "tie"),          # p1 = 0.55, p2 = 0.6: a leads, but 0.55 is not above 0.5 + 0.1
    (0.9, 0.8, 0.0, "inconsistent"),  # p1 = 0.9, p2 = 0.2: each order prefers slot A -> position, not answers
    (0.9, 0.45, 0.1, "tie"),          # p1 = 0.9, p2 = 0.55: a leads in both, but the second order within margin
    (0.58, 0.7, 0.1, "tie"),          # p1 = 0.58, p2 = 0.3: opposite leads, but 0.58 is within margin of 0.5
])
def test_both_orders_hand_checked(a_first, b_first, margin, verdict):
    judge = table_judge({("a", "b"): a_first, ("b", "a"): b_first})
    v = both_orders(judge, "q", "a", "b", "c", margin=margin)
    assert v.verdict == verdict
    assert v.p_a_first == pytest.approx(a_first) and v.p_a_second == pytest.approx(1 - b_first)
    assert v.p_a == pytest.approx((a_first + 1 - b_first) / 2)


# --- the planted position bias --------------------------------------------------------------------------------------


def test_both_orders_removes_a_planted_position_bias():
    """Qualities 0.0, 0.1, ..., 1.0; every ordered pair of different answers (11 * 10 = 110); K = 4, BIAS = 3.

    One order, answer a in slot A: P(A) > 1/2 iff 4d + 3 > 0 iff d > -0.75, d = q(a) - q(b) on a 0.1 grid.
      slot A picked: all but the pairs with d <= -0.8, i.e. 110 - (3 + 2 + 1) = 104 pairs (94.5%)
      agrees with truth: d > 0 (55 pairs) or d <= -0.8 (6 pairs) -> 61 / 110 = 55.5%, barely above a coin
    Both orders: p1 = sigmoid(4d + 3), p2 = 1 - sigmoid(-4d + 3) = sigmoid(4d - 3).
      both above 1/2 iff 4d > 3 (d >= 0.8); both below iff d <= -0.8: 2 * 6 = 12 pairs kept, all right;
      for 0 < |d| < 0.75 p1 > 1/2 > p2: inconsistent, 98 pairs dropped.
    """
    q = {f"answer {i}": i / 10 for i in range(11)}
    judge = BiasedJudge(q.__getitem__, k=4, bias=3)
    pairs = [(a, b) for a in q for b in q if a != b]
    assert len(pairs) == 110

    single = [judge("p", a, b, "c") > 0.5 for a, b in pairs]  # True = slot A (answer a) wins
    truth = [q[a] > q[b] for a, b in pairs]
    assert sum(single) == 104
    assert sum(s == t for s, t in zip(single, truth)) == 61  # 55.5%

    verdicts = [both_orders(judge, "p", a, b, "c") for a, b in pairs]
    kept = [(v.verdict == "a") == t for v, t in zip(verdicts, truth) if v.verdict in ("a", "b")]
    assert len(kept) == 12 and all(kept)  # 100% of kept verdicts agree with the truth
    assert sum(v.verdict == "inconsistent" for v in verdicts) == 98
    assert not any(v.verdict == "tie" for v in verdicts)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    from posttrain.runs import load_for_inference

    return load_for_inference(tiny_dir, None)


def test_rl_cai_drops_the_pairs_a_position_bias_decides(tiny):
    """Through rl_cai: a tiny random model samples 3 answers per prompt (3 pairs each), a judge with K = 8 and
    BIAS = 3 decides. A pair is kept iff |8 d| > 3, and then the chosen answer is the better one; every pair with
    |8 d| < 3 is one the bias decides in single-order judging, and it comes out inconsistent and is dropped."""
    k, bias = 8, 3
    judge = BiasedJudge(hashed_quality, k=k, bias=bias)
    rows, stats = rl_cai(tiny.model, tiny.tokenizer, PROMPTS, PRINCIPLES, judge, judge_name="biased", seed=0,
                         n_samples=3, temperature=1.0, max_new_tokens=8, policy_model="tiny")
    judged = [(first, second) for _, first, second, _ in judge.calls[::2]]  # (a, b) of each pair's first call
    assert stats["pairs"] == len(PROMPTS) * 3
    assert stats["pairs"] == stats["kept"] + stats["ties"] + stats["inconsistent"] + stats["identical"] + stats["empty"]
    assert len(judged) == stats["kept"] + stats["ties"] + stats["inconsistent"]

    d = [hashed_quality(a) - hashed_quality(b) for a, b in judged]
    bias_decided = sum(abs(k * x) < bias for x in d)
    single_right = sum((k * x + bias > 0) == (x > 0) for x in d)
    assert stats["inconsistent"] == bias_decided and stats["ties"] == 0
    assert stats["kept"] == len(judged) - bias_decided
    assert stats["kept"] >= 3 and bias_decided >= 3  # both kinds occur with this seed, so the test says something
    assert single_right < len(judged)  # one order gets the bias-decided pairs with d < 0 wrong
    # The judge's mean P(slot A) over both orders measures the planted bias: (sigmoid(8d + 3) + sigmoid(3 - 8d)) / 2.
    expected = sum(sigmoid(k * x + bias) + sigmoid(bias - k * x) for x in d) / (2 * len(d))
    assert stats["judge_p_slot_a"] == pytest.approx(expected) and expected > 0.75
    for row in rows:  # 100% of kept pairs agree with the truth
        assert hashed_quality(row["chosen"]) > hashed_quality(row["rejected"])
        prov = row["provenance"]
        assert prov["p_first_order"] > 0.5 and prov["p_second_order"] > 0.5
        q_c, q_r = hashed_quality(row["chosen"]), hashed_quality(row["rejected"])
        assert prov["p_first_order"] == pytest.approx(sigmoid(k * (q_c - q_r) + bias))   # chosen in slot A
        assert prov["p_second_order"] == pytest.approx(sigmoid(k * (q_c - q_r) - bias))  # chosen in slot B


# --- the constitution ---------------------------------------------------------------------------------------------


def test_default_constitution_ships_four_principles():
    principles = load_constitution(None)
    assert [p.name for p in principles] == ["harmlessness", "honesty", "helpfulness", "concision"]
    assert all(p.critique and p.revision and p.criterion for p in principles)
    assert load_constitution(DEFAULT_CONSTITUTION) == principles


def test_constitution_as_a_list_or_under_principles(tmp_path):
    item = "- name: kind\n  critique: Is it unkind?\n  revision: Rewrite it kindly.\n  criterion: Kinder is better.\n"
    (tmp_path / "list.yaml").write_text(item)
    (tmp_path / "dict.yaml").write_text("principles:\n" + item)
    expected = [Principle("kind", "Is it unkind?", "Rewrite it kindly.", "Kinder is better.")]
    assert load_constitution(tmp_path / "list.yaml") == expected
    assert load_constitution(str(tmp_path / "dict.yaml")) == expected


GOOD = "{name: a, critique: c, revision: r, criterion: k}"


@pytest.mark.parametrize("text, where, problem", [
    (f"- {GOOD}\n- {{name: b, critique: c, revision: r}}\n", "field 'principles[1].criterion'", "missing field"),
    (f"- {GOOD}\n- {{name: b, critique: c, revison: r, criterion: k}}\n", "field 'principles[1].revison'",
     "unknown field"),
    ("- {name: a, critique: '', revision: r, criterion: k}\n", "field 'principles[0].critique'", "non-empty text"),
    ("- {name: a, critique: 3, revision: r, criterion: k}\n", "field 'principles[0].critique'", "non-empty text"),
    (f"- {GOOD}\n- {GOOD}\n", "field 'principles[1].name'", "duplicate principle name 'a'"),
    ("- just text\n", "field 'principles[0]'", "expected a mapping"),
    ("principles: []\n", "field 'principles'", "non-empty list"),
    ("rules: []\n", "", "got the keys ['rules']"),
    ("- [unclosed\n", "", "invalid YAML"),
])
def test_bad_constitution_names_file_principle_and_field(tmp_path, text, where, problem):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(DataError) as exc:
        load_constitution(path)
    assert str(path) in str(exc.value) and where in str(exc.value) and problem in str(exc.value)


def test_missing_constitution_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_constitution(tmp_path / "nope.yaml")


# --- prompts ------------------------------------------------------------------------------------------------------


def test_read_prompts_from_text_and_rows(tmp_path):
    (tmp_path / "p.txt").write_text("first prompt\n\n  second prompt  \n")
    assert read_prompts(tmp_path / "p.txt") == ["first prompt", "second prompt"]
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "plain"},
        {"messages": [{"role": "user", "content": "old"}, {"role": "assistant", "content": "x"},
                      {"role": "user", "content": "last user turn"}, {"role": "assistant", "content": "y"}]},
        {"instruction": "Translate.", "input": "bonjour"},
        {"instruction": "Just this.", "input": ""}])
    assert read_prompts(path) == ["plain", "last user turn", "Translate.\n\nbonjour", "Just this."]


@pytest.mark.parametrize("row, where", [
    ({"text": "x"}, "row 2, field 'prompt': no prompt: expected a non-empty 'prompt'"),
    ({"prompt": ""}, "row 2, field 'prompt'"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "row 2, field 'messages': no user turn"),
    ({"messages": [{"role": "user", "content": " "}]}, "row 2, field 'messages[0].content'"),
])
def test_bad_prompt_rows_name_file_row_and_field(tmp_path, row, where):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "fine"}, row])
    with pytest.raises(DataError) as exc:
        read_prompts(path)
    assert str(exc.value).startswith(path) and where in str(exc.value)


# --- SL-CAI -------------------------------------------------------------------------------------------------------


def test_sl_cai_batches_three_steps_and_counts_empty_revisions(monkeypatch):
    """Answer, critique, revise are three batched calls; the critique and revision chats continue the
    conversation with the chosen principle's requests; an empty revision is dropped and counted."""
    calls = []

    def fake_generate(model, tokenizer, chats, **kw):
        calls.append((chats, kw))
        step = len(calls)
        return ["" if step == 3 and i == 1 else f"step{step} out{i}" for i in range(len(chats))]

    monkeypatch.setattr("posttrain.judge.cai.generate", fake_generate)
    prompts = ["p0", "p1", "p2"]
    rows, stats = sl_cai(None, None, prompts, PRINCIPLES, seed=5, max_new_tokens=7, temperature=0.5,
                         model_name="fake")
    assert len(calls) == 3 and all(len(chats) == 3 for chats, _ in calls)
    assert [kw["seed"] for _, kw in calls] == [5, 6, 7]
    assert stats == {"prompts": 3, "written": 2, "empty_revision": 1, "unchanged": 0}
    revise_chats = calls[2][0]
    by_name = {p.name: p for p in PRINCIPLES}
    for i, row in zip((0, 2), rows):
        pr = by_name[row["provenance"]["principle"]]
        assert revise_chats[i] == [{"role": "user", "content": prompts[i]},
                                   {"role": "assistant", "content": f"step1 out{i}"},
                                   {"role": "user", "content": pr.critique},
                                   {"role": "assistant", "content": f"step2 out{i}"},
                                   {"role": "user", "content": pr.revision}]
        assert row == {"messages": [{"role": "user", "content": prompts[i]},
                                    {"role": "assistant", "content": f"step3 out{i}"}],
                       "provenance": {"method": "sl-cai", "model": "fake", "principle": pr.name,
                                      "initial": f"step1 out{i}", "critique": f"step2 out{i}",
                                      "sampling": {"temperature": 0.5, "top_p": 1.0, "max_new_tokens": 7, "seed": 5}}}


def test_sl_cai_on_a_tiny_model_loads_through_the_sft_reader(tiny, tmp_path, tokenizer):
    kw = dict(seed=3, max_new_tokens=6, temperature=1.0, model_name="tiny")
    rows, stats = sl_cai(tiny.model, tiny.tokenizer, PROMPTS, PRINCIPLES, **kw)
    again, _ = sl_cai(tiny.model, tiny.tokenizer, PROMPTS, PRINCIPLES, **kw)
    assert rows == again  # seeded: same principles, same text
    assert stats["written"] + stats["empty_revision"] == len(PROMPTS) and rows
    assert {r["provenance"]["principle"] for r in rows} <= {"kind", "short"}
    path = write_jsonl(tmp_path / "sl.jsonl", rows)
    examples, kept, report = build_examples(path, tokenizer, max_seq_len=512)
    assert report.kept == len(rows) and kept[0][1] == rows[0]["messages"]


# --- RL-CAI -------------------------------------------------------------------------------------------------------


def test_rl_cai_on_a_tiny_model_loads_through_the_dpo_reader(tiny, tmp_path, tokenizer):
    judge = BiasedJudge(lambda text: len(text) / 100, k=50, bias=0)  # longer is better, no bias
    rows, stats = rl_cai(tiny.model, tiny.tokenizer, PROMPTS, PRINCIPLES, judge, judge_name="length", seed=1,
                         temperature=1.0, top_p=0.9, max_new_tokens=10, margin=0.05, policy_model="tiny")
    assert rows and stats["kept"] == len(rows)
    prov = rows[0]["provenance"]
    assert set(prov) == {"method", "judge_model", "judge_calibrated", "principle", "criterion", "p_first_order",
                         "p_second_order", "margin", "sampling"}
    assert prov["method"] == "rl-cai" and prov["judge_model"] == "length" and prov["margin"] == 0.05
    assert prov["criterion"] == {p.name: p.criterion for p in PRINCIPLES}[prov["principle"]]
    assert prov["sampling"] == {"temperature": 1.0, "top_p": 0.9, "max_new_tokens": 10, "seed": 1, "n_samples": 2,
                                "policy_model": "tiny"}
    assert all(len(r["chosen"]) > len(r["rejected"]) for r in rows)
    assert stats["judge_p_slot_a"] == pytest.approx(0.5)  # sigmoid(x) + sigmoid(-x) = 1: no position bias
    assert {c[3] for c in judge.calls} <= {p.criterion for p in PRINCIPLES}
    path = write_jsonl(tmp_path / "rl.jsonl", rows)
    pairs, report = build_pairs(path, tokenizer, max_seq_len=512)
    assert report.kept == len(rows)


def test_rl_cai_counts_identical_samples_and_refuses_greedy(tiny):
    judge = BiasedJudge(len, k=1, bias=0)
    # A temperature this low is greedy in effect: both samples are the same text, so nothing is judged.
    rows, stats = rl_cai(tiny.model, tiny.tokenizer, PROMPTS[:3], PRINCIPLES, judge, judge_name="j",
                         temperature=1e-6, max_new_tokens=5)
    assert rows == [] and stats["identical"] + stats["empty"] == 3 and not judge.calls
    with pytest.raises(ValueError, match="temperature > 0"):
        rl_cai(tiny.model, tiny.tokenizer, PROMPTS, PRINCIPLES, judge, judge_name="j", temperature=0)


# --- the command --------------------------------------------------------------------------------------------------


def test_cai_commands_on_a_tiny_model(tiny_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    common = ["--model", tiny_dir, "--max-new-tokens", "6", "--limit", "4", "--seed", "2"]
    assert main(["cai", "sl", str(prompts), "--out", str(tmp_path / "sl.jsonl"), *common]) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "sl.jsonl").read_text().splitlines()]
    assert f"4 prompts -> {len(rows)} rows written" in out and str(tmp_path / "sl.jsonl") in out
    assert rows[0]["provenance"]["model"] == tiny_dir

    code = main(["cai", "rl", str(prompts), "--out", str(tmp_path / "rl.jsonl"), *common, "--samples", "3"])
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "rl.jsonl").read_text().splitlines()]
    assert code == (0 if rows else 1) and f"4 prompts -> {len(rows)} rows written" in out
    assert "dropped:" in out and "(0.50 = no position bias)" in out
    for row in rows:  # the policy judged itself
        assert row["provenance"]["judge_model"] == row["provenance"]["sampling"]["policy_model"] == tiny_dir


def test_cai_command_errors_exit_2(tiny_dir, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"question": "?"}])
    assert main(["cai", "sl", bad, "--out", str(tmp_path / "o.jsonl"), "--model", tiny_dir]) == 2
    assert f"{bad}, row 2" in capsys.readouterr().err
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "ok"}])
    assert main(["cai", "sl", good, "--out", str(tmp_path / "o.json"), "--model", tiny_dir]) == 2
    assert ".jsonl" in capsys.readouterr().err
    (tmp_path / "c.yaml").write_text("- {name: a}\n")
    assert main(["cai", "rl", good, "--out", str(tmp_path / "o.jsonl"), "--constitution",
                 str(tmp_path / "c.yaml")]) == 2
    assert "principles[0].critique" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # greedy rl would make both samples the same
        main(["cai", "rl", good, "--out", str(tmp_path / "o.jsonl"), "--temperature", "0"])
    assert not (tmp_path / "o.jsonl").exists()


# --- the embedded model -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded():
    from posttrain.runs import load_for_inference

    return load_for_inference(None, None)


@pytest.mark.integration
def test_embedded_model_writes_sl_and_rl_cai_rows(embedded, tmp_path, tokenizer):
    from posttrain.judge import CalibratedJudge, ModelJudge

    principles = load_constitution(None)
    prompts = ["What is the capital of France?", "Give me one tip for sleeping better."]
    rows, stats = sl_cai(embedded.model, embedded.tokenizer, prompts, principles, seed=0, max_new_tokens=24,
                         temperature=0.7, model_name="embedded")
    assert stats["written"] == len(rows) >= 1
    assert all(r["messages"][1]["content"] and r["provenance"]["critique"] for r in rows)
    build_examples(write_jsonl(tmp_path / "sl.jsonl", rows), tokenizer, max_seq_len=1024)

    # The 135M model judging its own samples: its P(slot A) is ~0.8-0.9 whatever the answers (measured: about 2
    # log-odds of position bias against ~0.1 of signal), so both-orders judging drops every pair as inconsistent.
    # Calibrated on content-free pairs (each answer against itself), the slot preference is removed and some
    # pairs get the same verdict in both orders: those become preference rows with their provenance.
    prompts = [*prompts, "Explain what a rainbow is.", "Write a short thank-you note.", "Name three fruits.",
               "How do I boil an egg?"]
    raw = ModelJudge(embedded.model, embedded.tokenizer, name="embedded")
    rows, stats = rl_cai(embedded.model, embedded.tokenizer, prompts, principles, raw, judge_name="embedded",
                         seed=0, max_new_tokens=24, policy_model="embedded")
    assert stats["pairs"] == 6 == sum(stats[k] for k in ("kept", "ties", "inconsistent", "identical", "empty"))
    assert stats["judge_p_slot_a"] > 0.65 and stats["kept"] == len(rows) <= 1
    rows, stats = rl_cai(embedded.model, embedded.tokenizer, prompts, principles, CalibratedJudge(raw),
                         judge_name="embedded", seed=0, max_new_tokens=24, policy_model="embedded")
    assert abs(stats["judge_p_slot_a"] - 0.5) < 0.1 and stats["kept"] == len(rows) >= 1
    for r in rows:
        p = r["provenance"]
        assert p["judge_model"] == "embedded" and p["judge_calibrated"] and p["principle"] and \
            p["p_first_order"] > 0.5 and p["p_second_order"] > 0.5 and p["sampling"]["temperature"] == 1.0
    build_pairs(write_jsonl(tmp_path / "rl-embedded.jsonl", rows), tokenizer, max_seq_len=1024)

    # Preference rows from the embedded policy's samples, judged by a judge with a signal (shorter answers win,
    # plus a planted slot-A bias it has to see through).
    judge = BiasedJudge(lambda text: -len(text) / 5, k=1, bias=1)
    rows, stats = rl_cai(embedded.model, embedded.tokenizer, prompts, principles, judge, judge_name="shorter",
                         seed=0, max_new_tokens=24, policy_model="embedded")
    assert rows and all(len(r["chosen"]) < len(r["rejected"]) for r in rows)
    assert all(r["provenance"]["sampling"]["policy_model"] == "embedded" for r in rows)
    build_pairs(write_jsonl(tmp_path / "rl.jsonl", rows), tokenizer, max_seq_len=1024)


def test_calibration_removes_a_constant_slot_preference_exactly():
    """A judge with log-odds truth(first, second) + 2 (its slot-A bias): on an answer against itself the truth is 0, so
    the content-free verdict is sigmoid(2), and calibration leaves sigmoid(truth) in both orders."""
    import math

    from posttrain.judge import CalibratedJudge

    def truth(first, second):  # longer is better, 0.5 log-odds per character
        return 0.5 * (len(first) - len(second))

    calls = []

    def biased(prompt, first, second, criterion):
        calls.append((first, second))
        return 1 / (1 + math.exp(-(truth(first, second) + 2.0)))

    raw = both_orders(biased, "q", "abc", "ab", "c")
    assert raw.verdict == "inconsistent"  # sigmoid(0.5 + 2) = 0.924 and 1 - sigmoid(-0.5 + 2) = 0.182
    assert raw.p_a_first == pytest.approx(1 / (1 + math.exp(-2.5))) and raw.p_a_second == pytest.approx(
        1 - 1 / (1 + math.exp(-1.5)))
    calls.clear()
    cal = both_orders(CalibratedJudge(biased), "q", "abc", "ab", "c")
    assert cal.verdict == "a"
    assert cal.p_a_first == pytest.approx(1 / (1 + math.exp(-0.5))) == pytest.approx(cal.p_a_second)
    # two judged orders + one content-free verdict per answer, reused by the second order
    assert sorted(calls) == sorted([("abc", "ab"), ("ab", "abc"), ("abc", "abc"), ("ab", "ab")])
