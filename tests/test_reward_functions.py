"""Verifiable reward functions: the GSM8K verifier, format and JSON checks, combinations, user functions."""

import json
import sys

import pytest

from posttrain.rewards.functions import (
    Combined,
    final_number,
    gsm8k_answer,
    json_schema,
    length_penalty,
    regex_match,
    resolve_reward,
)

GOLD = "She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18"


def test_final_number_reads_the_answer_line():
    assert final_number("so the total is 1,234.\n#### 1,234") == 1234.0
    assert final_number("#### -3.5") == -3.5
    assert final_number("the answer is 7") is None
    assert final_number("the answer is 7.", strict=False) == 7.0


def test_gsm8k_answer_matches_the_reference_number():
    completions = ["9 * 2 = 18\n#### 18", "#### 18.0", "#### 17", "18", "no idea"]
    assert gsm8k_answer([""] * 5, completions, answer=[GOLD] * 5) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert gsm8k_answer([""], ["it is 18"], answer=[GOLD], strict=False) == [1.0]
    with pytest.raises(ValueError, match="answer"):
        gsm8k_answer([""], ["#### 1"])


def test_regex_and_json_schema():
    assert regex_match(["", ""], ["work...\n#### 4", "4"]) == [1.0, 0.0]
    assert regex_match([""], ['{"a": 1}'], pattern=r"\{.*\}", full=True) == [1.0]
    schema = {"type": "object", "required": ["name", "age"], "additionalProperties": False,
              "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}
    outs = [json.dumps({"name": "Ann", "age": 3}), json.dumps({"name": "Ann"}), json.dumps({"name": "A", "age": "3"}),
            json.dumps({"name": "A", "age": 3, "x": 1}), "not json", json.dumps({"name": "A", "age": True})]
    assert json_schema([""] * 6, outs, schema=schema) == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert json_schema([""], ["[1, 2]"]) == [1.0]


def test_length_penalty():
    assert length_penalty(["", ""], ["x" * 10, "x" * 30], max_chars=20, per_char=0.5) == [0.0, -5.0]


def test_combined_weighted_sum_min_and_user_function(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def shorter(prompts, completions, **row):\n    return [1.0 / (1 + len(c)) for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_reward("my_rewards:shorter") is resolve_reward("my_rewards.shorter")
    reward = Combined([("gsm8k_answer", 1.0, {}), ("regex", 0.5, {}), ("my_rewards:shorter", 2.0, {})])
    scores = reward(["", ""], ["#### 18", "18"], answer=[GOLD, GOLD])
    assert scores == pytest.approx([1.0 + 0.5 + 2.0 / 8, 0.0 + 0.0 + 2.0 / 3])
    assert reward.parts["regex"] == [1.0, 0.0]
    worst = Combined([("gsm8k_answer", 1.0, {}), ("regex", 0.5, {})], reduce="min")
    assert worst(["", ""], ["#### 18", "18"], answer=[GOLD, GOLD]) == [0.5, 0.0]
    sys.modules.pop("my_rewards", None)


def test_unknown_or_broken_rewards_are_clear():
    with pytest.raises(ValueError, match="built-ins: gsm8k_answer"):
        resolve_reward("nope")
    with pytest.raises(ValueError, match="cannot import"):
        resolve_reward("posttrain.rewards.functions:missing")
    bad = Combined([("builtins:len", 1.0, {})])  # callable, but not the interface: one number, not a list
    with pytest.raises(TypeError):
        bad(["", ""], ["a", "b"])
    short = Combined([("posttrain.rewards.functions:length_penalty", 1.0, {})])
    short.terms[0] = ("short", 1.0, lambda p, c, **r: [0.0], {})
    with pytest.raises(ValueError, match="returned 1 scores for 2 completions"):
        short(["", ""], ["a", "b"])
