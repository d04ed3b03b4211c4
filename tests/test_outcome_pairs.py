"""ORM pairs from PRM label files: grouping by question across files, the choice of chosen and rejected, the counts,
bad rows, and the CLI's file read back by the reward trainer's pair reader."""

import json

import pytest

from posttrain.cli import main
from posttrain.curate.outcome_pairs import outcome_pairs
from posttrain.data import build_pairs
from posttrain.errors import DataError
from tests.helpers import write_jsonl

SYSTEM = {"role": "system", "content": "Solve it. End with '#### <number>'."}


def chat(question: str) -> list[dict]:
    return [SYSTEM, {"role": "user", "content": question}]


def label_row(question: str, answer: str, steps: list[str], source: str | None, solution: str | None = None,
              split: str = "line") -> dict:
    """A row shaped as prm-labels writes it (labels are not read, so all 1)."""
    row = {"prompt": chat(question), "steps": steps, "labels": [1] * len(steps), "answer": answer}
    if source is not None:
        row["provenance"] = {"source": source, "solution": solution, "step_split": split}
    return row


A, B, C = "What is 2 + 3?", "What is 3 + 4?", "What is 2 + 2?"


@pytest.fixture
def files(tmp_path):
    ref = write_jsonl(tmp_path / "ref.jsonl", [
        label_row(A, "2 + 3 = 5\n#### 5", ["2 + 3 = 5", "#### 5"], "q.jsonl:1", "reference"),
        label_row(C, "#### 4", ["#### 4"], "q.jsonl:3", "reference"),
    ])
    sampled = write_jsonl(tmp_path / "sampled.jsonl", [
        label_row(A, "2 + 3 = 5\n#### 5", ["2 + 3 = 6", "#### 6"], "q.jsonl:1", "sampled"),
        label_row(B, "3 + 4 = 7\n#### 7", ["I think it is 8"], "q.jsonl:2", "sampled"),
        label_row(A, "2 + 3 = 5\n#### 5", ["2 + 3 = 5", "#### 5"], "q.jsonl:1", "sampled", split="paragraph"),
        label_row(C, "#### 4", [], "q.jsonl:3", "sampled"),  # an empty solution
        # No provenance: grouped by prompt; no '####', so the last number decides (1 + 1 = 2 is right).
        {"prompt": "What is 1 + 1?", "steps": ["1 + 1 = 2"], "labels": [1], "answer": "#### 2"},
        {"prompt": "What is 1 + 1?", "steps": ["1 + 1 = 3"], "labels": [0], "answer": "#### 2"},
    ])
    return ref, sampled


def read_out(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sampled_right_solution_is_chosen_over_the_reference_and_files_join_by_source(files, tmp_path):
    ref, sampled = files
    report = outcome_pairs([ref, sampled], tmp_path / "pairs.jsonl")
    assert report.to_dict() == {"out": str(tmp_path / "pairs.jsonl"), "questions": 4, "pairs": 2, "all_correct": 1,
                                "all_wrong": 1, "empty": 1, "chosen_sampled": 1}
    first, second = read_out(tmp_path / "pairs.jsonl")
    # Question A: the reference (ref.jsonl row 1) is right, but the sampled right one (its paragraph joiner kept)
    # is chosen; the rejected one is the first wrong solution, from the other file.
    assert first["prompt"] == chat(A)
    assert (first["chosen"], first["rejected"]) == ("2 + 3 = 5\n\n#### 5", "2 + 3 = 6\n#### 6")
    assert first["provenance"] == {
        "chosen": {"source": "q.jsonl:1", "solution": "sampled", "row": f"{sampled}:3"},
        "rejected": {"source": "q.jsonl:1", "solution": "sampled", "row": f"{sampled}:1"}, "from": "outcome-pairs"}
    # The row-less question, grouped by its prompt: the only right solution is chosen, whatever its kind.
    assert (second["prompt"], second["chosen"], second["rejected"]) == ("What is 1 + 1?", "1 + 1 = 2", "1 + 1 = 3")
    assert second["provenance"]["chosen"] == {"source": None, "solution": None, "row": f"{sampled}:5"}


def test_reference_is_chosen_without_a_sampled_right_one_and_one_file_alone_gives_no_pair(files, tmp_path):
    ref, sampled = files
    rows = [json.loads(x) for x in (tmp_path / "sampled.jsonl").read_text().splitlines()]
    only_wrong = write_jsonl(tmp_path / "wrong.jsonl", rows[:2])  # A's wrong one, B's
    report = outcome_pairs([ref, only_wrong], tmp_path / "p.jsonl")
    (pair,) = read_out(tmp_path / "p.jsonl")
    assert (pair["chosen"], pair["rejected"]) == ("2 + 3 = 5\n#### 5", "2 + 3 = 6\n#### 6")
    assert pair["provenance"]["chosen"]["solution"] == "reference"
    assert (report.pairs, report.all_correct, report.all_wrong, report.chosen_sampled) == (1, 1, 1, 0)
    # The reference file alone: every question is all correct, nothing is written.
    alone = outcome_pairs([ref], tmp_path / "none.jsonl")
    assert (alone.questions, alone.pairs, alone.all_correct, alone.all_wrong) == (2, 0, 2, 0)
    assert (tmp_path / "none.jsonl").read_text() == ""


def test_question_with_only_wrong_solutions_is_counted_all_wrong(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [
        label_row(B, "#### 7", ["3 + 4 = 8", "#### 8"], "q.jsonl:2", "sampled"),
        label_row(B, "#### 7", ["#### 6"], "q.jsonl:2", "sampled"),
    ])
    report = outcome_pairs([path], tmp_path / "p.jsonl")
    assert (report.questions, report.pairs, report.all_wrong, report.all_correct) == (1, 0, 1, 0)
    assert read_out(tmp_path / "p.jsonl") == []


def test_prompt_mismatch_names_both_rows(files, tmp_path):
    ref, _ = files
    other = write_jsonl(tmp_path / "other.jsonl", [
        label_row(B, "#### 7", ["#### 7"], "q.jsonl:2", "sampled"),
        label_row("What is 2 + 30?", "2 + 3 = 5\n#### 5", ["#### 6"], "q.jsonl:1", "sampled"),
    ])
    with pytest.raises(DataError) as err:
        outcome_pairs([ref, other], tmp_path / "p.jsonl")
    assert (err.value.file, err.value.row, err.value.field) == (other, 2, "prompt")
    assert f"{ref} row 1" in err.value.problem
    assert not (tmp_path / "p.jsonl").exists()


@pytest.mark.parametrize(("change", "field"), [
    ({"steps": None}, "steps"), ({"steps": "#### 5"}, "steps"), ({"steps": ["#### 5", 5]}, "steps[1]"),
    ({"answer": None}, "answer"), ({"answer": "no number"}, "answer"), ({"prompt": None}, "prompt"),
    ({"prompt": 3}, "prompt"), ({"provenance": {"step_split": "word"}}, "provenance.step_split"),
])
def test_bad_rows_name_file_row_and_field(tmp_path, change, field):
    good = label_row(A, "#### 5", ["#### 5"], "q.jsonl:1", "sampled")
    bad = {k: v for k, v in {**good, **change}.items() if v is not None}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, bad])
    with pytest.raises(DataError) as err:
        outcome_pairs([path], tmp_path / "p.jsonl")
    assert (err.value.file, err.value.row, err.value.field) == (path, 2, field)


def test_cli_writes_pairs_the_reward_reader_loads(files, tmp_path, tokenizer, capsys):
    ref, sampled = files
    out = tmp_path / "orm" / "pairs.jsonl"
    assert main(["data", "outcome-pairs", ref, sampled, "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["questions"], printed["pairs"], printed["all_correct"], printed["all_wrong"]) == (4, 2, 1, 1)
    pairs, report = build_pairs(str(out), tokenizer, max_seq_len=256)
    assert (report.rows, report.kept, report.bad) == (2, 2, [])
    assert pairs[0].prompt == chat(A) and pairs[1].prompt == [{"role": "user", "content": "What is 1 + 1?"}]
    assert main(["data", "outcome-pairs", ref, "--out", str(out)]) == 0  # the one-line summary, then a warning
    shown = capsys.readouterr().out
    assert "0 pairs" in shown and "nothing for an ORM to learn" in shown
