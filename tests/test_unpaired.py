"""Unpaired preference data for KTO: row validation (file, row and field in every error), the rendering shared with
DPO's pairs, the report and its class balance, over-long rows, the paper's class weights, and `posttrain data unpair`
(pair files, HH-style and prompt/chosen/rejected, to unpaired rows that build_unpaired reads back)."""

import json

import pytest

from posttrain.cli import main
from posttrain.curate.unpair import unpair
from posttrain.data import build_pairs, build_unpaired, suggested_weights
from posttrain.errors import DataError
from tests.helpers import write_jsonl

GOOD = {"prompt": "Name a colour.", "completion": "Blue.", "label": True}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a fruit."}]


@pytest.mark.parametrize("row, field, words", [
    ({"completion": "Blue.", "label": True}, "prompt", "missing field"),
    ({"prompt": "  ", "completion": "Blue.", "label": True}, "prompt", "is empty"),
    ({"prompt": [], "completion": "Blue.", "label": True}, "prompt", "is empty"),
    ({"prompt": 7, "completion": "Blue.", "label": True}, "prompt", "got int"),
    ({"prompt": [{"role": "user", "content": " "}], "completion": "Blue.", "label": True}, "prompt[0].content",
     "last user turn) is empty"),
    ({"prompt": CHAT[:3], "completion": "Blue.", "label": True}, "prompt+completion[3].role", "wrong role order"),
    ({"prompt": "Name a colour.", "label": True}, "completion", "missing field"),
    ({"prompt": "Name a colour.", "completion": " ", "label": True}, "completion", "is empty"),
    ({"prompt": "Name a colour.", "completion": [{"role": "assistant", "content": ""}], "label": True},
     "completion[0].content", "is empty"),
    ({"prompt": "Name a colour.", "completion": [{"role": "user", "content": "Blue."}], "label": True},
     "completion[0]", "only assistant messages"),
    ({"prompt": "Name a colour.", "completion": "Blue."}, "label", "missing field"),
    ({"prompt": "Name a colour.", "completion": "Blue.", "label": 1}, "label", "got int 1; 0/1 is not read"),
    ({"prompt": "Name a colour.", "completion": "Blue.", "label": 0.0}, "label", "got float 0.0"),
    ({"prompt": "Name a colour.", "completion": "Blue.", "label": "yes"}, "label", "got str 'yes'"),
    ({"prompt": "Name a colour.", "completion": "Blue.", "label": "true"}, "label", "got str 'true'"),  # not CSV
])
def test_bad_rows_name_file_row_and_field(tmp_path, tokenizer, row, field, words):
    path = write_jsonl(tmp_path / "kto.jsonl", [GOOD, row])
    with pytest.raises(DataError) as info:
        build_unpaired(path, tokenizer, max_seq_len=256)
    assert (info.value.file, info.value.row, info.value.field) == (path, 2, field)
    assert str(info.value).startswith(f"{path}, row 2, field {field!r}: ")
    assert words in str(info.value)


def test_csv_labels_are_read_from_true_and_false_only(tmp_path, tokenizer):
    path = tmp_path / "kto.csv"
    path.write_text("prompt,completion,label\nName a colour.,Blue.,TRUE\nName a colour.,Seven.,false\n")
    rows, report = build_unpaired(str(path), tokenizer, max_seq_len=256)
    assert [r.label for r in rows] == [True, False] and (report.desirable, report.undesirable) == (1, 1)
    path.write_text("prompt,completion,label\nName a colour.,Blue.,1\n")
    with pytest.raises(DataError, match=r"row 2, field 'label': .*got str '1'"):
        build_unpaired(str(path), tokenizer, max_seq_len=256)


def trained_ids(ex) -> list[int]:
    return [t for t, on in zip(ex.input_ids, ex.trained) if on]


def test_completions_render_as_dpo_renders_the_same_responses(tmp_path, tokenizer):
    pairs_file = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."},
        {"prompt": CHAT, "chosen": [{"role": "assistant", "content": "A pear."}], "rejected": "A chair."},
    ])
    # The same rows written by hand in TRL's unpaired format, standard and conversational.
    kto_file = write_jsonl(tmp_path / "kto.jsonl", [
        {"prompt": "Name a colour.", "completion": "Blue.", "label": True},
        {"prompt": "Name a colour.", "completion": "Seven.", "label": False},
        {"prompt": CHAT, "completion": [{"role": "assistant", "content": "A pear."}], "label": True},
        {"prompt": CHAT, "completion": [{"role": "assistant", "content": "A chair."}], "label": False},
    ])
    pairs, _ = build_pairs(pairs_file, tokenizer, max_seq_len=256)
    rows, report = build_unpaired(kto_file, tokenizer, max_seq_len=256)
    assert [r.row for r in rows] == [1, 2, 3, 4] and [r.index for r in rows] == [0, 1, 2, 3]
    for pair, (good, bad) in zip(pairs, [rows[0:2], rows[2:4]]):
        assert (good.label, bad.label) == (True, False)
        for ex, row in ((pair.chosen, good), (pair.rejected, bad)):
            assert row.example.input_ids == ex.input_ids and row.example.trained == ex.trained
            assert row.completion_ids == trained_ids(ex)
            assert row.prompt_ids == ex.input_ids[:ex.trained.index(True)]
        assert good.prompt == pair.prompt
    assert tokenizer.decode(rows[0].completion_ids).startswith("Blue.")
    assert report.tokens == sum(len(r) for r in rows) == sum(len(p) for p in pairs)


def test_report_counts_and_notes_a_small_class(tmp_path, tokenizer):
    rows = [{**GOOD, "completion": f"Blue {i}."} for i in range(3)] + [{**GOOD, "label": False}]
    _, report = build_unpaired(write_jsonl(tmp_path / "f.jsonl", rows), tokenizer, max_seq_len=256)
    assert (report.rows, report.kept, report.desirable, report.undesirable) == (4, 4, 3, 1)
    assert report.summary().startswith(f"{tmp_path / 'f.jsonl'}: 4 rows: 3 desirable, 1 undesirable (75%/25%), ")
    assert report.imbalance is None
    rows = [{**GOOD, "completion": f"Blue {i}."} for i in range(10)] + [{**GOOD, "label": False}]
    _, report = build_unpaired(write_jsonl(tmp_path / "g.jsonl", rows), tokenizer, max_seq_len=256)
    # 1 of 11 rows; lambda_D in [1/10, 4/3 * 1/10], nearest to 1: 0.1333.
    assert "only 9.1% of the rows are undesirable" in report.imbalance
    assert "desirable_weight=0.133, undesirable_weight=1" in report.imbalance
    assert report.imbalance in report.summary()


def test_overlong_rows_are_dropped_or_truncated_and_counted(tmp_path, tokenizer):
    long = {**GOOD, "completion": "blue " * 60, "label": False}
    path = write_jsonl(tmp_path / "f.jsonl", [GOOD, long, GOOD])
    (short, full, _), _ = build_unpaired(path, tokenizer, max_seq_len=512)
    cap = len(short) + 5
    assert len(full) > cap
    with pytest.raises(DataError, match=rf"row 2: {len(full)} tokens, more than data.max_seq_len={cap}"):
        build_unpaired(path, tokenizer, max_seq_len=cap)
    rows, report = build_unpaired(path, tokenizer, max_seq_len=cap, overlong="drop")
    assert [r.row for r in rows] == [1, 3] and report.dropped_overlong == [2] and report.truncated == []
    assert (report.rows, report.kept, report.undesirable) == (3, 2, 0)
    assert "1 dropped as over-long" in report.summary()
    rows, report = build_unpaired(path, tokenizer, max_seq_len=cap, overlong="truncate")
    assert report.truncated == [2] and report.dropped_overlong == [] and report.undesirable == 1
    cut = rows[1]
    assert len(cut) == cap and cut.prompt_ids == full.prompt_ids
    assert cut.completion_ids == full.completion_ids[:cap - len(full.prompt_ids)]
    assert "1 truncated" in report.summary()
    with pytest.raises(DataError, match="the prompt alone fills data.max_seq_len=3"):
        build_unpaired(path, tokenizer, max_seq_len=3, overlong="truncate")


@pytest.mark.parametrize("n_d, n_u, weights", [
    (60, 50, (1.0, 1.0)),  # 1.2 is already in [1, 4/3]
    (50, 50, (1.0, 1.0)),
    (70, 50, (4 / 3 * 50 / 70, 1.0)),  # 1.4 is above 4/3: lambda_D = 0.952 brings it to 4/3
    (50, 70, (70 / 50, 1.0)),  # 0.714 is below 1: lambda_D = 1.4 brings it to 1
    (10, 100, (10.0, 1.0)),  # the paper's 1:10 example: lambda_D in [10, 13.33]
    (5, 0, (1.0, 1.0)),  # one class: no ratio to set
])
def test_suggested_weights_keep_the_papers_ratio(n_d, n_u, weights):
    d_w, u_w = suggested_weights(n_d, n_u)
    assert (d_w, u_w) == pytest.approx(weights)
    if n_u:
        assert 1.0 - 1e-12 <= d_w * n_d / (u_w * n_u) <= 4 / 3 + 1e-12


def test_suggested_weights_refuse_no_rows():
    with pytest.raises(ValueError, match="not both 0"):
        suggested_weights(0, 0)


HH_TURNS = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Name a colour.\n\nAssistant: "


def read_out(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_unpair_hh_file_gives_two_labelled_rows_a_pair(tmp_path, tokenizer):
    src = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": HH_TURNS + "Blue.", "rejected": HH_TURNS + "I won't."},
        {"chosen": HH_TURNS + "Red.", "rejected": HH_TURNS + "Red."},  # identical: skipped, counted
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant:  "},  # empty: listed
        {"chosen": "\n\nHuman: Count.\n\nAssistant: 1 2 3", "rejected": "\n\nHuman: Count.\n\nAssistant: no"},
    ])
    counts = unpair(src, tmp_path / "kto.jsonl")
    assert {k: counts[k] for k in ("pairs", "rows", "desirable", "undesirable", "identical", "identical_rows",
                                   "bad")} == {"pairs": 4, "rows": 4, "desirable": 2, "undesirable": 2,
                                               "identical": 1, "identical_rows": [2], "bad": 1}
    assert counts["bad_rows"] == [{"row": 3, "problem": "rejected: empty response"}]
    out = read_out(tmp_path / "kto.jsonl")
    assert [(r["provenance"]["row"], r["provenance"]["side"], r["label"]) for r in out] == [
        (1, "chosen", True), (1, "rejected", False), (4, "chosen", True), (4, "rejected", False)]
    assert all(r["provenance"]["source"] == src for r in out)
    assert out[0]["prompt"] == [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                                {"role": "user", "content": "Name a colour."}]
    assert out[0]["completion"] == [{"role": "assistant", "content": "Blue."}]
    assert out[1]["completion"] == [{"role": "assistant", "content": "I won't."}]
    rows, report = build_unpaired(str(tmp_path / "kto.jsonl"), tokenizer, max_seq_len=256)
    pairs, _ = build_pairs(src, tokenizer, max_seq_len=256, bad_pairs="drop")
    assert (report.desirable, report.undesirable) == (2, 2)
    assert [r.completion_ids for r in rows] == [trained_ids(e) for p in pairs for e in (p.chosen, p.rejected)]


def test_unpair_prompt_chosen_rejected_file_and_the_cli(tmp_path, tokenizer, capsys):
    src = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."},
        {"prompt": CHAT, "chosen": "A pear.", "rejected": [{"role": "assistant", "content": "A chair."}]},
        {"prompt": "Say hi.", "chosen": "Hi!", "rejected": " Hi! "},  # identical once stripped
    ])
    assert main(["data", "unpair", src, "--out", str(tmp_path / "kto.jsonl")]) == 0
    printed = capsys.readouterr().out
    assert "3 pairs, 2 unpaired" in printed and "4 rows: 2 desirable, 2 undesirable (50%/50%)" in printed
    assert "identical pairs skipped (chosen and rejected say the same, so neither label fits): rows 3" in printed
    out = read_out(tmp_path / "kto.jsonl")
    assert [r["label"] for r in out] == [True, False, True, False]
    assert out[0]["prompt"] == [{"role": "user", "content": "Name a colour."}] and out[2]["prompt"] == CHAT
    assert out[3]["completion"] == [{"role": "assistant", "content": "A chair."}]
    rows, report = build_unpaired(str(tmp_path / "kto.jsonl"), tokenizer, max_seq_len=256)
    assert report.kept == 4 and [r.label for r in rows] == [True, False, True, False]
    assert main(["data", "unpair", src, "--out", str(tmp_path / "kto2.jsonl"), "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert (counts["rows"], counts["identical"], counts["identical_rows"]) == (4, 1, [3])
    assert (tmp_path / "kto2.jsonl").read_text() == (tmp_path / "kto.jsonl").read_text()
    assert main(["data", "unpair", src, "--out", str(tmp_path / "kto.txt")]) == 2  # not JSON lines
