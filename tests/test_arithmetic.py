"""Arithmetic word problems for the calculator task: seeded, disjoint splits, answers that follow from their steps,
the step mix, calculator demonstrations in the OpenAI tool-call shape, and the ``posttrain data arithmetic`` CLI."""

from __future__ import annotations

import json
import re
from collections import Counter
from fractions import Fraction

import pytest

from posttrain.cli import main
from posttrain.curate.arithmetic import STEP_MIX, TEMPLATES, make_splits, step_counts, write_arithmetic
from posttrain.envs.schemas import CALCULATOR
from posttrain.errors import ConfigError

STEP = re.compile(r"^(\d+) ([-+*/]) (\d+)$")


@pytest.fixture(scope="module")
def splits():
    return make_splits(train=600, test=200, demos=300, seed=0)


def evaluate(steps: list[str]) -> list[Fraction]:
    """Every step's value, computed here (not by the module), checking that each step starts from the last value."""
    values: list[Fraction] = []
    for i, step in enumerate(steps):
        m = STEP.match(step)
        assert m, f"step {step!r} is not 'a op b'"
        left, op, right = Fraction(int(m[1])), m[2], Fraction(int(m[3]))
        if i:
            assert left == values[-1], f"step {i + 1} {step!r} does not start from the previous result {values[-1]}"
        values.append({"+": left + right, "-": left - right, "*": left * right, "/": left / right}[op])
    return values


def operands(steps: list[str]) -> list[int]:
    """The numbers the question gives: step 1's two operands, then every later step's right operand."""
    parsed = [STEP.match(s) for s in steps]
    return [int(parsed[0][1])] + [int(m[3]) for m in parsed]


def all_problems(splits):
    return [p for problems in splits.values() for p in problems]


def test_templates_are_varied():
    assert len(TEMPLATES) >= 12
    assert {len(t.ops) for t in TEMPLATES} == {1, 2, 3}
    assert {op for t in TEMPLATES for op in t.ops} == set("+-*/")


def test_deterministic_by_seed():
    a = make_splits(train=40, test=10, demos=10, seed=7)
    assert a == make_splits(train=40, test=10, demos=10, seed=7)
    other = make_splits(train=40, test=10, demos=10, seed=8)
    assert [p.prompt for p in a["train"]] != [p.prompt for p in other["train"]]


def test_test_split_does_not_depend_on_train_size():
    small, large = (make_splits(train=n, test=20, demos=3, seed=1) for n in (5, 50))
    assert small["test"] == large["test"]


def test_splits_are_disjoint_and_sized(splits):
    assert {k: len(v) for k, v in splits.items()} == {"train": 600, "test": 200, "demos": 300}
    prompts = {k: [p.prompt for p in v] for k, v in splits.items()}
    for name, texts in prompts.items():
        assert len(set(texts)) == len(texts), f"{name} repeats a question"
    assert not set(prompts["train"]) & set(prompts["test"])
    assert not set(prompts["train"]) & set(prompts["demos"])
    assert not set(prompts["test"]) & set(prompts["demos"])


def test_answers_follow_from_steps(splits):
    for p in all_problems(splits):
        values = evaluate(list(p.steps))
        for v in values:
            assert v.denominator == 1 and v > 0, f"{p.steps}: intermediate {v} is not a positive integer"
        assert p.answer == str(int(values[-1]))
        assert list(p.results) == [int(v) for v in values]
        assert p.to_row() == {"prompt": p.prompt, "answer": p.answer, "steps": list(p.steps)}


def test_operands_have_two_to_four_digits_and_appear_in_the_question(splits):
    for p in all_problems(splits):
        for n in operands(list(p.steps)):
            assert 2 <= len(str(n)) <= 4, f"{p.steps}: operand {n}"
            assert re.search(rf"(?<!\d){n}(?!\d)", p.prompt), f"operand {n} is not in {p.prompt!r}"


def test_step_mix(splits):
    for name, problems in splits.items():
        counts = Counter(len(p.steps) for p in problems)
        assert set(counts) == {1, 2, 3}
        for k, share in STEP_MIX.items():
            assert abs(counts[k] - share * len(problems)) <= 1, f"{name}: {counts}"
    for n in range(60):
        c = step_counts(n)
        assert sum(c.values()) == n and min(c.values()) >= 0


def test_questions_do_not_leak_the_answer_and_are_short(splits):
    for p in all_problems(splits):
        assert not re.search(rf"(?<!\d){p.answer}(?!\d)", p.prompt), p.prompt
        assert p.prompt.endswith("?")
        sentences = [s for s in re.split(r"(?<=[.?])\s+", p.prompt) if s]
        assert 1 <= len(sentences) <= 2, p.prompt
        assert "{" not in p.prompt and "}" not in p.prompt


def template_pattern(text: str) -> re.Pattern:
    pattern = re.escape(text)
    for field in "abcd":
        pattern = pattern.replace(re.escape("{" + field + "}"), r"\d+")
    return re.compile("^" + re.sub(r"\\\{\w+\\\}", ".+?", pattern) + "$")


def test_every_template_is_used(splits):
    patterns = [template_pattern(t.text) for t in TEMPLATES]
    used = Counter()
    for p in all_problems(splits):
        matches = [i for i, pat in enumerate(patterns) if pat.match(p.prompt)]
        assert matches, f"{p.prompt!r} matches no template"
        assert all(len(TEMPLATES[i].ops) == len(p.steps) for i in matches)
        used.update(matches)
    assert set(used) == set(range(len(TEMPLATES)))


def check_demo(row: dict, steps: list[str], answer: str) -> None:
    assert row["tools"] == [CALCULATOR] and row["answer"] == answer
    msgs = row["messages"]
    assert msgs[0]["role"] == "user" and msgs[0]["content"]
    assert len(msgs) == 2 + 2 * len(steps)
    (field,) = CALCULATOR["function"]["parameters"]["properties"]
    values = evaluate(steps)
    for i, (step, value) in enumerate(zip(steps, values)):
        call, result = msgs[1 + 2 * i], msgs[2 + 2 * i]
        assert call["role"] == "assistant" and call["content"] == ""
        (tc,) = call["tool_calls"]
        assert tc["type"] == "function" and tc["function"]["name"] == "calculator"
        assert tc["id"] == f"call_{i + 1}" == result["tool_call_id"]
        assert isinstance(tc["function"]["arguments"], str)
        assert json.loads(tc["function"]["arguments"]) == {field: step}
        assert result == {"role": "tool", "tool_call_id": tc["id"], "name": "calculator", "content": str(int(value))}
    assert msgs[-1] == {"role": "assistant", "content": f"The answer is {answer}."}


def test_write_and_demo_rows(tmp_path):
    sizes = write_arithmetic(tmp_path / "d", train=30, test=12, demos=20, seed=5)
    assert sizes == {"train": 30, "test": 12, "demos": 20}
    out = tmp_path / "d"
    assert sorted(f.name for f in out.iterdir()) == ["meta.json", "sft.jsonl", "test.jsonl", "train.jsonl"]
    read = lambda name: [json.loads(line) for line in (out / name).read_text().splitlines()]  # noqa: E731
    expected = make_splits(train=30, test=12, demos=20, seed=5)
    assert read("train.jsonl") == [p.to_row() for p in expected["train"]]
    assert read("test.jsonl") == [p.to_row() for p in expected["test"]]
    demos = read("sft.jsonl")
    assert len(demos) == 20
    for row, p in zip(demos, expected["demos"]):
        assert row["messages"][0]["content"] == p.prompt
        check_demo(row, list(p.steps), p.answer)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["seed"] == 5 and meta["sizes"] == sizes
    assert meta["step_mix"] == {"1": 0.3, "2": 0.45, "3": 0.25}


def test_bad_size_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="train"):
        write_arithmetic(tmp_path, train=-1)


def test_cli_writes_the_files(tmp_path, capsys):
    out = tmp_path / "arith"
    assert main(["data", "arithmetic", "--out", str(out), "--train", "25", "--test", "8", "--demos", "6",
                 "--seed", "2"]) == 0
    printed = capsys.readouterr().out
    for name, n in (("train.jsonl", 25), ("test.jsonl", 8), ("sft.jsonl", 6)):
        assert len((out / name).read_text().splitlines()) == n
        assert name in printed and f"{n} rows" in printed
    assert main(["data", "arithmetic", "--out", str(out), "--train", "3", "--test", "1", "--demos", "1",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["files"] == {"train.jsonl": 3, "test.jsonl": 1, "sft.jsonl": 1}
    assert len((out / "train.jsonl").read_text().splitlines()) == 3
    assert main(["data", "arithmetic", "--out", str(out), "--demos", "-2"]) == 2
