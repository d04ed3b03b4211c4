import math

import pytest
import torch

from posttrain.errors import DataError
from posttrain.eval import best_of_n as bon
from posttrain.eval.best_of_n import (
    SELECTORS,
    Pool,
    best_of_n_metrics,
    check_options,
    score_pools,
    select_majority,
    select_oracle,
    select_orm,
    select_prm_min,
    select_prm_vote,
    vote,
)
from posttrain.eval.suites import run_suite
from posttrain.report import workflow_report_html
from posttrain.report.best_of_n import best_of_n_html, best_of_n_results
from tests.helpers import write_jsonl


class FakeORM:
    """Scores a response by a table of its text; records what it was asked."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def score(self, prompts, responses, batch_size=8):
        self.calls.append((list(prompts), list(responses)))
        return [self.table[r] for r in responses]


class FakePRM:
    """One probability per step, by a table of the step's text."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def score_steps(self, prompts, step_lists, batch_size=8):
        self.calls.append([list(s) for s in step_lists])
        return [[self.table[s] for s in steps] for steps in step_lists]


def pool(answers, correct=None, orm=None, prm=None):
    return Pool(list(answers), list(correct or [False] * len(answers)), orm, prm)


# --- the selectors, by hand ---

def test_majority_vote_and_its_ties():
    # 5 has three votes against 3's two
    assert select_majority(pool([3, 5, 5, 3, 5])) == 1
    # 3 and 5 tie at two votes; 3 was sampled first (sample 0), so its first solution is picked
    assert select_majority(pool([3, 5, 5, 3, 7])) == 0
    # 5 and 3 tie; 7 (sample 0) has one vote, so the tie goes to 5, sampled before 3 (sample 1 vs 2)
    assert select_majority(pool([7, 5, 3, 3, 5])) == 1
    # solutions without a final number do not vote; none at all: the first solution
    assert select_majority(pool([None, None, 4.0])) == 2
    assert select_majority(pool([None, None])) == 0


def test_orm_picks_the_highest_score_through_score_pools():
    texts = ["so #### 3", "so #### 4", "so #### 4 again"]
    orm = FakeORM({"so #### 3": 0.2, "so #### 4": 1.5, "so #### 4 again": 1.5})
    (p,) = score_pools(["What is 2+2?"], [texts], ["#### 4"], orm=orm)
    assert p.answers == [3.0, 4.0, 4.0] and p.correct == [False, True, True]
    assert p.orm == [0.2, 1.5, 1.5]
    assert select_orm(p) == 1  # 1.5 twice: the earlier sample
    assert orm.calls == [(["What is 2+2?"] * 3, texts)]  # one call for every sample of every question


def test_prm_min_scores_the_weakest_step_of_non_empty_lines():
    prm = FakePRM({"a": 0.9, "b": 0.3, "#### 1": 0.8, "c": 0.6, "#### 2": 0.7})
    texts = ["a\n\nb\n#### 1", "c\n  #### 2  \n", ""]
    (p,) = score_pools(["q"], [texts], ["#### 2"], prm=prm)
    # min(0.9, 0.3, 0.8) = 0.3; min(0.6, 0.7) = 0.6; the empty sample has no step: 0.0, and is not sent
    assert p.prm == pytest.approx([0.3, 0.6, 0.0])
    assert prm.calls == [[["a", "b", "#### 1"], ["c", "#### 2"]]]
    assert select_prm_min(p) == 1


def test_prm_vote_weights_answers_by_their_solutions_scores():
    # answers 5, 5, 8. Majority: 5 (two votes). PRM vote: 5 weighs 0.1 + 0.2 = 0.3, 8 weighs 0.9 -> 8
    p = pool([5, 5, 8], prm=[0.1, 0.2, 0.9])
    assert select_majority(p) == 0
    assert select_prm_vote(p) == 2
    # 0.6 + 0.6 = 1.2 for 5 beats 8's 0.9: the vote keeps 5 where prm_min would pick sample 2
    p = pool([5, 5, 8], prm=[0.6, 0.6, 0.9])
    assert select_prm_vote(p) == 0 and select_prm_min(p) == 2
    # weights need not be votes of one: an answer without a number never counts
    assert vote([None, 2.0], [5.0, 0.1]) == 1


def test_oracle_is_pass_at_n_on_nested_subsets():
    p = pool([1, 2, 3, 4], correct=[False, False, True, False])
    assert select_oracle(p) == 2 and select_oracle(p.first(2)) == 0  # none right among the first 2: sample 0
    metrics, hib = best_of_n_metrics([p], [1, 2, 4], ["oracle"])
    assert (metrics["oracle@1"], metrics["oracle@2"], metrics["oracle@4"]) == (0.0, 0.0, 1.0)
    assert hib["oracle@4"] is True and hib["oracle@4_se"] is False


def test_nested_subsets_and_the_metrics_by_hand():
    a = pool([7, 4, 4], correct=[False, True, True], orm=[0.0, 1.0, 2.0], prm=[0.5, 0.1, 0.2])
    b = pool([9, 9, 1], correct=[True, True, False], orm=[0.1, 0.0, 3.0], prm=[0.9, 0.8, 0.1])
    first = a.first(1)
    assert (first.answers, first.correct, first.orm, first.prm) == ([7], [False], [0.0], [0.5])
    metrics, _ = best_of_n_metrics([a, b], [1, 3], list(SELECTORS))
    # N=1: every selector picks sample 0: a wrong, b right -> 0.5, se sqrt(0.5 * 0.5 / 2) = 0.35355
    for name in SELECTORS:
        assert metrics[f"{name}@1"] == 0.5
        assert metrics[f"{name}@1_se"] == pytest.approx(math.sqrt(0.125))
    # N=3: majority a -> 4 (right), b -> 9 (right): 1.0, se 0
    assert metrics["majority@3"] == 1.0 and metrics["majority@3_se"] == 0.0
    # orm: a -> sample 2 (2.0, right), b -> sample 2 (3.0, wrong): 0.5
    assert metrics["orm@3"] == 0.5
    # prm_min: a -> sample 0 (0.5, wrong), b -> sample 0 (0.9, right): 0.5
    assert metrics["prm_min@3"] == 0.5
    # prm_vote: a: 7 weighs 0.5, 4 weighs 0.3 -> 7 (wrong); b: 9 weighs 1.7 -> right: 0.5
    assert metrics["prm_vote@3"] == 0.5
    assert metrics["oracle@3"] == 1.0 and metrics["first@3"] == 0.5


# --- options ---

def test_options_are_checked_and_named(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "1+1?", "answer": "#### 2"}])
    with pytest.raises(ValueError, match=r"unknown option\(s\) nn .*it reads: .*orm"):
        run_suite("best_of_n", None, None, path, options={"nn": [1]})
    assert check_options({}).ns == [1, 4, 16]
    assert check_options({"n": [8, 2]}).ns == [2, 8]
    for options, name in [({"n": [0, 2]}, "n"), ({"n": [2, 2]}, "n"), ({"n": 4}, "n"),
                          ({"temperature": 0}, "temperature"), ({"max_new_tokens": 0}, "max_new_tokens"),
                          ({"seed": "x"}, "seed"), ({"orm": 3}, "orm"),
                          ({"prm": ["a"]}, "prm"), ({"prompt_field": 1}, "prompt_field")]:
        with pytest.raises(ValueError, match=rf"options\.{name}:"):
            check_options(options)


def test_a_reference_without_a_number_names_row_and_field(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "1+1?", "answer": "#### 2"},
                                              {"question": "2+2?", "answer": "four"}])
    with pytest.raises(DataError, match=r"row 2, field 'answer': no number"):
        run_suite("best_of_n", None, None, path)


# --- the suite end to end, and its report ---

def test_suite_end_to_end_on_the_tiny_model(tiny_dir, tokenizer, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    path = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "Tom has 3 apples, buys 4. How many?", "answer": "#### 7"},
                                                {"question": "What is 6 times 2?", "answer": "12\n#### 12"}])
    loaded = {}
    monkeypatch.setattr(bon, "load_reward", lambda p: loaded.setdefault("orm", FakeORM(_ByLength())))
    monkeypatch.setattr(bon, "load_prm", lambda p: loaded.setdefault("prm", FakePRM(_Half())))
    r = run_suite("best_of_n", model, tokenizer, path, batch_size=2,
                  options={"n": [1, 2], "max_new_tokens": 6, "orm": "runs/rm", "prm": "runs/prm"})
    names = ["first", "majority", "orm", "prm_min", "prm_vote", "oracle"]
    assert set(r.metrics) == {f"{s}@{n}{e}" for s in names for n in (1, 2) for e in ("", "_se")} | {"truncated"}
    for s in names:  # best-of-1 is the first sample whatever the selector
        assert r.metrics[f"{s}@1"] == r.metrics["first@1"]
        assert r.metrics["oracle@2"] >= r.metrics[f"{s}@2"]
    assert all(0.0 <= v <= 1.0 for v in r.metrics.values())
    assert [d["row"] for d in r.details] == [1, 2] and all(len(d["samples"]) == 2 for d in r.details)
    assert len(loaded["orm"].calls[0][1]) == 4  # 2 questions x N_max 2, scored in one pass
    # One pass of N_max: sample 0 drawn with n [1] is sample 0 drawn with n [1, 2]; no ORM/PRM: their selectors
    # are skipped and listed
    alone = run_suite("best_of_n", model, tokenizer, path, options={"n": [1], "max_new_tokens": 6})
    assert [d["samples"] for d in alone.details] == [d["samples"][:1] for d in r.details]
    assert set(alone.metrics) == {f"{s}@1{e}" for s in ("first", "majority", "oracle") for e in ("", "_se")} | {
        "truncated"}
    assert alone.details[0]["skipped"] == ["orm", "prm_min", "prm_vote"]


class _ByLength(dict):
    def __missing__(self, text):
        return float(len(text))


class _Half(dict):
    def __missing__(self, step):
        return 0.5


def test_report_table_and_plot_of_accuracy_against_n():
    rows = {"gsm/majority@1": {"baseline": 0.5, "sft": 0.6}, "gsm/majority@1_se": {"baseline": 0.25, "sft": 0.2},
            "gsm/majority@4": {"baseline": 0.75, "sft": 0.8}, "gsm/majority@4_se": {"baseline": 0.2, "sft": 0.1},
            "gsm/oracle@4": {"baseline": 1.0}, "gsm/oracle@4_se": {"baseline": 0.0},
            "gsm/pass@1": {"baseline": 0.3}, "gsm/truncated": {"baseline": 0.1}}
    evals = {"columns": ["baseline", "sft"], "rows": rows, "higher_is_better": {}}
    results = best_of_n_results(evals)
    assert results == {"gsm": {"baseline": {"majority": {1: (0.5, 0.25), 4: (0.75, 0.2)}, "oracle": {4: (1.0, 0.0)}},
                               "sft": {"majority": {1: (0.6, 0.2), 4: (0.8, 0.1)}}}}  # pass@1 has no _se twin
    html = best_of_n_html(evals)
    assert "0.75 \u00b1 0.2" in html and "N=4" in html and html.count("<svg") == 1
    assert ">4</text>" in html  # the x axis is labelled with N, not log2 N
    page = workflow_report_html(title="w", stages=[], evals=evals, gates=[], runs={}, config_text="")
    eval_table = page.split("<h2>evaluation by stage</h2>")[1].split("<h2>")[0]
    assert "gsm/majority@4<" in eval_table and "majority@4_se" not in eval_table and "gsm/pass@1" in eval_table
    assert "<h2>best-of-N</h2>" in page
