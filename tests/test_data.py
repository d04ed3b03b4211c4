"""Readers, row formats, validation errors (file, row, field), over-length policy and the hold-out split."""

import json

import pytest

from posttrain.data import build_examples, holdout_split, read_rows, row_to_messages
from posttrain.errors import DataError
from tests.helpers import write_jsonl

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def test_reads_jsonl_json_csv_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.csv").write_text("prompt,completion\na,b\nc,d\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.json", "d.csv", "d.parquet"):
        got = read_rows(tmp_path / name)
        assert [r for _, r in got] == rows, name
    assert [n for n, _ in read_rows(tmp_path / "d.csv")] == [2, 3]  # spreadsheet numbering: header is row 1


def test_formats_become_messages():
    assert row_to_messages({"instruction": "Sum", "input": "1 2", "output": "3"}, "auto", "f", 1) == [
        {"role": "user", "content": "Sum\n\n1 2"}, {"role": "assistant", "content": "3"}]
    assert row_to_messages({"prompt": "p", "completion": "c"}, "auto", "f", 1, system_prompt="S")[0] == {
        "role": "system", "content": "S"}
    assert row_to_messages(GOOD, "messages", "f", 1)[1]["content"] == "hello"


BAD_ROWS = [
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "end with an assistant turn"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, "messages[0].content", "missing field"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "messages[0].role", "wrong role order"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "messages[1].role", "wrong role order"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]},
     "messages[1].content", "empty assistant turn"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ["x"]}]},
     "messages[1].content[0]", "expected a content part"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 5}]},
     "messages[1].content", "expected a string, got int"),
    ({"messages": [{"role": "robot", "content": "a"}]}, "messages[0].role", "role must be one of"),
    ({"instruction": "do", "output": 5}, "output", "expected a string, got int"),
    ({"prompt": "p", "completion": ""}, "completion", "is empty"),
    ({"question": "q", "answer": "a"}, None, "cannot tell the row format"),
]


@pytest.mark.parametrize("bad,field,problem", BAD_ROWS)
def test_malformed_row_names_file_row_and_field(tmp_path, tokenizer, bad, field, problem):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(DataError) as err:
        build_examples(path, tokenizer, max_seq_len=256)
    e = err.value
    assert (e.file, e.row, e.field) == (path, 3, field)
    assert problem in str(e) and path in str(e) and "row 3" in str(e)


def test_unreadable_files(tmp_path, tokenizer):
    (tmp_path / "broken.jsonl").write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(DataError, match=r"broken.jsonl, row 2: invalid JSON"):
        read_rows(tmp_path / "broken.jsonl")
    with pytest.raises(DataError, match="does not exist"):
        read_rows(tmp_path / "missing.jsonl")
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(DataError, match="unknown file type"):
        read_rows(tmp_path / "data.txt")
    (tmp_path / "latin.jsonl").write_bytes(b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin.jsonl, row 1, field 'prompt': not valid UTF-8: byte 0xe9 at byte "
                       "offset 15 of the file"):
        read_rows(tmp_path / "latin.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        read_rows(tmp_path / "empty.jsonl")


def test_overlong_policy_is_explicit_and_counted(tmp_path, tokenizer):
    long = {"prompt": "Say it.", "completion": "word " * 200}
    path = write_jsonl(tmp_path / "t.jsonl", [GOOD, long, GOOD])
    with pytest.raises(DataError, match=r"row 2: \d+ tokens, more than data.max_seq_len=64"):
        build_examples(path, tokenizer, max_seq_len=64)
    ex, _, rep = build_examples(path, tokenizer, max_seq_len=64, overlong="drop")
    assert len(ex) == 2 and rep.dropped_overlong == [2] and "1 dropped as over-long (rows 2)" in rep.summary()
    ex, _, rep = build_examples(path, tokenizer, max_seq_len=64, overlong="truncate")
    assert len(ex) == 3 and rep.truncated == [2] and max(len(e) for e in ex) == 64
    assert "1 truncated (rows 2)" in rep.summary()


def test_no_trainable_token_after_truncation_is_an_error(tmp_path, tokenizer):
    row = {"prompt": "context " * 100, "completion": "yes"}
    path = write_jsonl(tmp_path / "t.jsonl", [row])
    with pytest.raises(DataError, match="row 1, field 'messages': no assistant token is left to train on after"):
        build_examples(path, tokenizer, max_seq_len=32, overlong="truncate")


def test_held_out_by_group_keeps_a_question_on_one_side():
    from posttrain.data import held_out

    items = ["a1", "b1", "a2", "c1", "b2", "c2", "d1"]
    groups = [s[0] for s in items]
    _, hold_groups = holdout_split(4, 0.5, seed=1)  # the split of the 4 groups a, b, c, d, in order of appearance
    held_names = {"abcd"[g] for g in hold_groups}
    train, held, lines = held_out(items, 0.5, 1, "rows", groups=groups)
    assert held == [s for s in items if s[0] in held_names] and train == [s for s in items if s[0] not in held_names]
    assert len(held_names) == 2 and not {s[0] for s in train} & {s[0] for s in held}
    assert lines == [f"held out {len(held)} of 7 rows, 2 of 4 groups (eval_fraction=0.5, split_seed=1)"]


def test_holdout_split_is_fixed_by_seed():
    a = holdout_split(100, 0.1, seed=3)
    assert a == holdout_split(100, 0.1, seed=3)
    assert a != holdout_split(100, 0.1, seed=4)
    train, held = a
    assert len(held) == 10 and sorted(train + held) == list(range(100))
    assert holdout_split(10, 0.0, 0) == (list(range(10)), [])
