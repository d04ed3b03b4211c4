"""Malformed and unusual input files: every problem is refused naming file, row and field, nothing is dropped
silently, and the common variants (byte-order marks, OpenAI content parts) are read."""

import codecs
import gzip
import json

import pytest

from posttrain.data import (
    build_examples,
    build_pairs,
    pair_schedule,
    read_rows,
    row_to_messages,
    row_to_pair,
    sft_schedule,
    validate_messages,
)
from posttrain.errors import DataError
from tests.helpers import write_jsonl

ROW = {"prompt": "Say hi", "completion": "Hello"}


def _error(path) -> DataError:
    with pytest.raises(DataError) as err:
        read_rows(path)
    return err.value


# 1. Ragged CSV rows

def test_csv_row_with_an_extra_field_is_refused_naming_the_row(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('prompt,completion\nA,B\n"Say hi",Hello,extra\n')
    e = _error(path)
    assert (e.row, e.field) == (3, None)
    assert "3 fields but the header has 2" in str(e) and "'extra'" in str(e) and "t.csv, row 3" in str(e)


def test_csv_row_with_a_missing_field_is_refused_naming_the_field(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("prompt,completion\nA,B\nSay hi\n")
    e = _error(path)
    assert (e.row, e.field) == (3, "completion") and "1 field but the header has 2" in str(e)


def test_csv_header_naming_a_column_twice_is_refused(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("prompt,prompt,completion\na,b,c\n")
    e = _error(path)
    assert (e.row, e.field) == (1, "prompt") and "twice" in str(e)


def test_csv_rows_keep_spreadsheet_numbers_across_quoted_newlines_and_blank_lines(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('prompt,completion\n"two\nlines",b\n\nc,d\n')
    assert read_rows(path) == [(2, {"prompt": "two\nlines", "completion": "b"}),
                               (4, {"prompt": "c", "completion": "d"})]


# 2. UTF-8 byte-order mark

BOM_FILES = {
    "t.jsonl": (json.dumps(ROW) + "\n").encode(),
    "t.json": json.dumps([ROW]).encode(),
    "t.csv": b"prompt,completion\nSay hi,Hello\n",
}


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("name", sorted(BOM_FILES))
def test_utf8_byte_order_mark_is_read(tmp_path, name, gz):
    data = codecs.BOM_UTF8 + BOM_FILES[name]
    path = tmp_path / (name + ".gz" if gz else name)
    path.write_bytes(gzip.compress(data) if gz else data)
    assert [row for _, row in read_rows(path)] == [ROW]  # the CSV header is 'prompt', not '\ufeffprompt'


def test_utf16_file_is_refused_saying_so(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes((json.dumps(ROW) + "\n").encode("utf-16"))
    assert "UTF-16" in str(_error(path))


# 3. OpenAI content parts

def _parts(*texts):
    return [{"type": "text", "text": t} for t in texts]


def test_text_content_parts_are_joined_with_a_newline():
    got = validate_messages([{"role": "system", "content": _parts("Be brief.")},
                             {"role": "user", "content": _parts("Doc: x", "Question: y?")},
                             {"role": "assistant", "content": _parts("y", "")},
                             {"role": "user", "content": []},
                             {"role": "assistant", "content": "z"}], "f", 1)
    assert [m["content"] for m in got] == ["Be brief.", "Doc: x\nQuestion: y?", "y\n", "", "z"]
    assert all(set(m) == {"role", "content"} for m in got)


def test_content_parts_train_exactly_as_the_joined_string(tmp_path, tokenizer):
    as_parts = {"messages": [{"role": "user", "content": _parts("Say", "hi")},
                             {"role": "assistant", "content": _parts("Hello", "!")}]}
    as_text = {"messages": [{"role": "user", "content": "Say\nhi"}, {"role": "assistant", "content": "Hello\n!"}]}
    a, _, _ = build_examples(write_jsonl(tmp_path / "a.jsonl", [as_parts]), tokenizer, max_seq_len=256)
    b, _, _ = build_examples(write_jsonl(tmp_path / "b.jsonl", [as_text]), tokenizer, max_seq_len=256)
    assert (a[0].input_ids, a[0].trained) == (b[0].input_ids, b[0].trained)


@pytest.mark.parametrize("part", [{"type": "image_url", "image_url": {"url": "http://x/y.png"}},
                                  {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}])
def test_non_text_content_part_is_refused_naming_type_and_path(tmp_path, tokenizer, part):
    row = {"messages": [{"role": "user", "content": _parts("hi")},
                        {"role": "assistant", "content": [*_parts("look:"), part]}]}
    path = write_jsonl(tmp_path / "t.jsonl", [ROW, row])
    with pytest.raises(DataError) as err:
        build_examples(path, tokenizer, max_seq_len=256)
    e = err.value
    assert (e.row, e.field) == (2, "messages[1].content[1].type") and repr(part["type"]) in e.problem


@pytest.mark.parametrize("content,field,problem", [
    (["x"], "messages[0].content[0]", "expected a content part"),
    ([{"text": "x"}], "messages[0].content[0].type", "missing field"),
    ([{"type": "text"}], "messages[0].content[0].text", "missing field"),
    ([{"type": "text", "text": 3}], "messages[0].content[0].text", "expected a string, got int"),
])
def test_malformed_content_parts_name_the_part(content, field, problem):
    with pytest.raises(DataError) as err:
        validate_messages([{"role": "user", "content": content}, {"role": "assistant", "content": "a"}], "f", 4)
    assert (err.value.row, err.value.field) == (4, field) and problem in err.value.problem


def test_preference_rows_accept_text_parts_and_refuse_others():
    chat = [{"role": "user", "content": _parts("Name", "a colour.")}]
    row = {"chosen": [*chat, {"role": "assistant", "content": _parts("Blue.")}],
           "rejected": [{"role": "user", "content": "Name\na colour."}, {"role": "assistant", "content": "No."}]}
    prompt, chosen, rejected = row_to_pair(row, "f", 1)  # parts and text of the same prompt count as one prompt
    assert prompt == [{"role": "user", "content": "Name\na colour."}]
    assert chosen == [{"role": "assistant", "content": "Blue."}]
    assert rejected == [{"role": "assistant", "content": "No."}]
    _, chosen, _ = row_to_pair({"prompt": chat, "chosen": [{"role": "assistant", "content": _parts("Red", ".")}],
                                "rejected": "No."}, "f", 1)
    assert chosen == [{"role": "assistant", "content": "Red\n."}]
    image = {"type": "image_url", "image_url": {"url": "u"}}
    for bad, field in (({"prompt": [{"role": "user", "content": [image]}], "chosen": "a", "rejected": "b"},
                        "prompt[0].content[0].type"),
                       ({"prompt": "q", "chosen": [{"role": "assistant", "content": [image]}], "rejected": "b"},
                        "chosen[0].content[0].type")):
        with pytest.raises(DataError) as err:
            row_to_pair(bad, "f", 2)
        assert (err.value.row, err.value.field) == (2, field) and "'image_url'" in err.value.problem


# 4. Invalid UTF-8: the row, the field and the byte's offset

BAD = "caf\xe9".encode("latin-1")
LATIN = {
    "t.jsonl": (b'{"prompt": "a", "completion": "b"}\n\n{"prompt": "' + BAD + b'", "completion": "c"}\n', 3, "prompt"),
    "t.csv": (b'prompt,completion\na,b\n"two\nlines",' + BAD + b"\n", 3, "completion"),
    "t.json": (b'[{"prompt": "a", "completion": "b"},\n {"prompt": "x", "completion": ["' + BAD + b'"]}]', 2,
               "completion[0]"),
}


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("name", sorted(LATIN))
def test_invalid_utf8_names_row_field_and_byte_offset(tmp_path, name, gz):
    data, row, field = LATIN[name]
    path = tmp_path / (name + ".gz" if gz else name)
    path.write_bytes(gzip.compress(data) if gz else data)
    e = _error(path)
    assert (e.row, e.field) == (row, field)
    of = "of the decompressed data" if gz else "of the file"
    assert f"byte 0xe9 at byte offset {data.index(0xe9)} {of}" in e.problem and "UTF-8" in e.problem


def test_invalid_utf8_offset_counts_the_byte_order_mark(tmp_path):
    path = tmp_path / "t.jsonl"
    data = codecs.BOM_UTF8 + b'{"prompt": "' + BAD + b'"}\n'
    path.write_bytes(data)
    assert f"byte offset {data.index(0xe9)} of the file" in _error(path).problem


# 5. JSON decode errors

@pytest.mark.parametrize("name,data,where", [
    ("t.jsonl", b'{"prompt": "a"}\n{"prompt": "a\tb"}\n',
     "row 2: invalid JSON: Invalid control character '\\t' at column 14"),
    ("t.json", b'[{"prompt": "a"},\n{"prompt": "a\tb"}]',
     "invalid JSON: Invalid control character '\\t' at line 2, column 14"),
    ("t.jsonl", b'{"prompt": "ab}\n', "row 1: invalid JSON: Unterminated string starting at column 12"),
])
def test_json_errors_read_once_with_their_position(tmp_path, name, data, where):
    (tmp_path / name).write_bytes(data)
    message = str(_error(tmp_path / name))
    assert where in message and "at at" not in message


# 6. A file for another command

def test_sft_on_a_preference_file_points_to_dpo_and_reward(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError) as err:
        build_examples(path, tokenizer, max_seq_len=256)
    assert err.value.row == 1 and "preference pair" in err.value.problem
    assert "posttrain dpo" in err.value.problem and "posttrain reward" in err.value.problem


def test_sft_on_a_prompt_only_file_points_to_grpo():
    with pytest.raises(DataError) as err:
        row_to_messages({"prompt": "2+2?", "answer": "4"}, "auto", "f", 1)
    assert err.value.field == "completion" and "posttrain grpo" in err.value.problem


# 7 and 8. The plan: epochs the steps really cover, and steps that must repeat rows

def _examples(tmp_path, tokenizer, n):
    rows = [{"prompt": f"Count to {i}.", "completion": "ok " * (i % 3 + 1)} for i in range(n)]
    return build_examples(write_jsonl(tmp_path / "t.jsonl", rows), tokenizer, max_seq_len=256)[0]


def _plan(examples, micro=2, accum=2):
    return sft_schedule(examples, micro_batch_size=micro, grad_accum=accum, seed=0, pad_id=0, packing=False,
                        max_seq_len=256)


def test_epochs_text_shows_the_epochs_the_steps_cover(tmp_path, tokenizer):
    plan = _plan(_examples(tmp_path, tokenizer, 20))  # 4 examples a step, 5 steps an epoch
    assert plan.epochs_text(plan.steps_for(2.0), 2.0) == "2.0 epochs"
    assert plan.epochs_text(3, 2.0) == "0.6 epochs (max_steps cuts 2.0)"
    assert plan.epochs_text(15, 2.0) == "3 epochs (max_steps runs past 2.0)"
    short = _plan(_examples(tmp_path, tokenizer, 18))
    assert short.epochs_text(short.steps_for(1.0), 1.0) == "1.11 epochs (rounded up to whole steps)"


def test_sft_run_line_shows_epochs_cut_by_max_steps(tmp_path, tiny_dir, capsys):
    from posttrain.cli import main

    data = write_jsonl(tmp_path / "t.jsonl", [{"prompt": f"Say {i}.", "completion": f"{i}"} for i in range(10)])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{name: {tiny_dir}}}\ndata: {{train: {data}, eval_fraction: 0, packing: false}}\n"
                   f"output_dir: {tmp_path / 'o'}\ntrain: {{max_steps: 1, micro_batch_size: 2, epochs: 2.0}}\n"
                   "eval_samples: 0\n")
    assert main(["sft", str(cfg), "lora.r=2"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "training 1 steps: 10 examples x 0.2 epochs (max_steps cuts 2.0), 2 per step" in err
    assert "repeats rows" not in err


def test_step_with_fewer_rows_than_it_needs_repeats_them_and_says_so(tmp_path, tokenizer):
    examples = _examples(tmp_path, tokenizer, 3)
    plan = _plan(examples, micro=2, accum=4)  # 8 a step from 3 examples
    warning = plan.repeat_warning()
    assert warning.startswith("\nwarning: only 3 examples for a step of 8: each step repeats rows, some more often")
    assert "at most 3" in warning
    rows = sorted(plan.unit(k)[0].row for k in range(plan.per_step))  # what step 0 trains on
    assert len(rows) == 8 and set(rows) == {1, 2, 3}  # the step stays full, so rows repeat: the warning is true
    assert _plan(examples, micro=3, accum=1).repeat_warning() == ""
    even = _plan(examples, micro=3, accum=2).repeat_warning()
    assert "each step repeats rows;" in even  # 6 = 2 x 3: every row exactly twice, so not uneven


def test_pair_plan_warns_with_its_own_unit(tmp_path, tokenizer):
    rows = [{"prompt": f"Q{i}?", "chosen": "yes", "rejected": "no"} for i in range(2)]
    pairs, _ = build_pairs(write_jsonl(tmp_path / "p.jsonl", rows), tokenizer, max_seq_len=128)
    plan = pair_schedule(pairs, micro_batch_size=4, grad_accum=1, seed=0, pad_id=0, packing=False,
                         max_seq_len=128)
    assert "only 2 pairs for a step of 4" in plan.repeat_warning()
    assert plan.epochs_text(1, 1.0) == "2 epochs (rounded up to whole steps)"
