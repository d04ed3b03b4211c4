"""Data curation: dedup, MinHash, contamination, stratification audit, Cohen's kappa, length bias, the CLI.

Texts are random words from a small vocabulary (seeded), so unrelated texts share no 5- or 8-word run and every
similarity below is worked out by counting shingles.
"""

import argparse
import json
import random

import pytest

from posttrain.cli.data import add_commands
from posttrain.curate import (
    agreement,
    audit,
    cohen_kappa,
    contamination,
    dedup_file,
    estimate_jaccard,
    jaccard,
    landis_koch,
    length_bias,
    minhash,
    ngrams,
    row_text,
)
from posttrain.errors import ConfigError, DataError

VOCAB = ("apple river stone cloud green quick table light music paper bread north window silver garden "
         "yellow horse candle winter market ocean pencil forest copper bottle rocket mirror planet basket "
         "thunder meadow violet anchor castle feather harbor lantern marble pepper saddle tunnel velvet").split()


def words(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(VOCAB) for _ in range(n)]


def text(n: int, seed: int) -> str:
    return " ".join(words(n, seed))


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


# ------------------------------------------------------------------------------------------------------- dedup

def _one_word_changed(t: str, index: int) -> str:
    w = t.split()
    w[index] = "zebra"  # not in VOCAB
    return " ".join(w)


def _dedup_rows() -> list[dict]:
    a, b, c = text(40, 1), text(40, 2), text(40, 3)
    q, ans = text(20, 4), text(20, 5)
    return [
        {"text": a},                                                     # 1 kept
        {"prompt": q, "completion": ans},                                # 2 kept
        {"text": b},                                                     # 3 kept
        {"text": text(40, 10)},                                          # 4 unrelated, kept
        {"text": a},                                                     # 5 exact copy of 1
        {"messages": [{"role": "system", "content": "Be brief."},        # 6 exact copy of 2 in another format,
                      {"role": "user", "content": q.upper() + "?"},      #   case, punctuation and system prompt
                      {"role": "assistant", "content": ans + "."}]},     #   do not count
        {"text": _one_word_changed(b, 0)},                               # 7 near copy of 3 (first word)
        {"text": c},                                                     # 8 kept
        {"text": _one_word_changed(c, 20)},                              # 9 near copy of 8 (middle word)
        {"text": text(40, 11)},                                          # 10 unrelated, kept
    ]


def test_dedup_finds_planted_copies_and_keeps_the_rest(tmp_path):
    rows = _dedup_rows()
    src = write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "clean.jsonl"
    # 40 words -> 36 word 5-grams. The first word changed breaks 1 shingle: J = 35 / 37 = 0.946. A middle word
    # breaks 5: J = 31 / 41 = 0.756, so the test runs at threshold 0.7 to catch both.
    report = dedup_file(src, out, threshold=0.7, report_path=tmp_path / "report.json")
    removed = {r.row: (r.duplicate_of, r.kind, r.similarity) for r in report.removed}
    assert removed == {5: (1, "exact", 1.0), 6: (2, "exact", 1.0), 7: (3, "near", round(35 / 37, 4)),
                       9: (8, "near", round(31 / 41, 4))}
    assert (report.rows, report.kept, report.exact, report.near) == (10, 6, 2, 2)
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert kept == [rows[i - 1] for i in (1, 2, 3, 4, 8, 10)]  # unchanged, in order
    assert json.loads((tmp_path / "report.json").read_text())["near"] == 2


def test_dedup_default_threshold_keeps_a_copy_below_it(tmp_path):
    # At the default 0.8 the middle-word copy (true Jaccard 0.756) is not a duplicate: the decision is taken on the
    # true Jaccard, whatever the MinHash estimate says. The first-word copy (0.946) still is.
    src = write_jsonl(tmp_path / "train.jsonl", _dedup_rows())
    report = dedup_file(src, tmp_path / "clean.jsonl")
    assert {r.row: r.duplicate_of for r in report.removed} == {5: 1, 6: 2, 7: 3}
    with pytest.raises(ConfigError):
        dedup_file(src, src)  # never overwrite the input


def test_minhash_estimates_jaccard_and_is_deterministic():
    w = [f"w{i}" for i in range(80)]
    a, b = set(ngrams(w[:60], 5)), set(ngrams(w[20:], 5))
    # 56 shingles each; shared are those starting at w20..w55: 36; union 56 + 56 - 36 = 76.
    assert jaccard(a, b) == pytest.approx(36 / 76)
    sig_a, sig_b = minhash(a), minhash(b)
    assert abs(estimate_jaccard(sig_a, sig_b) - 36 / 76) < 0.1  # sd of a 128-permutation estimate is 0.044
    assert (minhash(a) == sig_a).all() and estimate_jaccard(sig_a, minhash(a)) == 1.0
    # Pinned values: blake2b and exact uint64 arithmetic, the same on every machine and process (no salted hash()).
    assert minhash({("hello", "world")}, num_perm=4).tolist() == [
        2756273490, 761006244, 1279970486, 3114049504]
    assert ngrams(["a", "b"], 5) == [("a", "b")] and ngrams([], 5) == []


def test_row_text_normalises_every_format():
    assert row_text({"text": "Hello,  World!"}, "f", 1) == "hello world"
    msgs = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi?"},
                         {"role": "assistant", "content": "Yo."}]}
    assert row_text(msgs, "f", 1) == "hi yo"
    assert row_text({"instruction": "Do", "input": "it", "output": "Done!"}, "f", 1) == "do it done"
    assert row_text({"prompt": "P", "chosen": "C c", "rejected": "R"}, "f", 1) == "p c c r"
    hh = {"chosen": "\n\nHuman: Hi\n\nAssistant: Good day", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away"}
    assert row_text(hh, "f", 1) == "hi good day go away"
    assert row_text({"question": "1+1?", "answer": "#### 2"}, "f", 1) == "1 1 2"


def test_malformed_rows_name_file_row_and_field(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [
        {"text": "fine"}, {"text": "fine too"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 5}]}])
    with pytest.raises(DataError) as err:
        dedup_file(bad, tmp_path / "out.jsonl")
    assert (err.value.file, err.value.row, err.value.field) == (bad, 3, "messages[1].content")
    assert "bad.jsonl, row 3, field 'messages[1].content'" in str(err.value)
    with pytest.raises(DataError) as err:
        row_text({"text": 7}, "x.jsonl", 4)
    assert (err.value.row, err.value.field) == (4, "text")
    with pytest.raises(DataError, match="no text to compare"):
        row_text({"label": "a"}, "x.jsonl", 2)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a"}])
    with pytest.raises(DataError) as err:
        length_bias(pairs)
    assert (err.value.row, err.value.field) == (1, "rejected")
    assert not (tmp_path / "out.jsonl").exists()  # nothing written on error


# ------------------------------------------------------------------------------------------------ contamination

def _contamination_files(tmp_path):
    # 12 eval rows of 15 + 15 words: 30 words -> 23 word 8-grams each.
    eval_rows = [{"prompt": text(15, 100 + i), "completion": text(15, 200 + i)} for i in range(12)]
    verbatim, edited = [0, 3, 5, 8, 11], [2, 9]
    planted = []
    for i in verbatim:  # as chat rows with a system prompt: the format must not hide the leak
        planted.append({"messages": [{"role": "system", "content": "You are helpful."},
                                     {"role": "user", "content": eval_rows[i]["prompt"]},
                                     {"role": "assistant", "content": eval_rows[i]["completion"]}]})
    for i in edited:  # the answer's first word (word 15) changed: breaks the 8 grams starting at words 8..15
        planted.append({"prompt": eval_rows[i]["prompt"],
                        "completion": _one_word_changed(eval_rows[i]["completion"], 0)})
    filler = [{"text": text(30, 300 + i)} for i in range(30 - len(planted))]
    train_rows = filler[:10] + planted[:4] + filler[10:] + planted[4:]
    train = write_jsonl(tmp_path / "train.jsonl", train_rows)
    ev = write_jsonl(tmp_path / "eval.jsonl", eval_rows)
    clean = write_jsonl(tmp_path / "clean.jsonl", [r for i, r in enumerate(eval_rows) if i not in verbatim + edited])
    # Eval row (1-based) -> the train row holding it.
    where = {i + 1: train_rows.index(p) + 1 for i, p in zip(verbatim + edited, planted)}
    return train, ev, clean, verbatim, edited, where, eval_rows


def test_contamination_finds_every_planted_eval_row(tmp_path):
    train, ev, _, verbatim, edited, where, eval_rows = _contamination_files(tmp_path)
    report = contamination(train, ev)
    assert report.train_rows == 30 and len(report.rows) == 12
    by_row = {r.row: r for r in report.rows}
    assert {r.row for r in report.contaminated} == {i + 1 for i in verbatim + edited}  # all 7, no clean one
    for i in verbatim:
        r = by_row[i + 1]
        assert (r.shared, r.ngrams, r.fraction, r.longest_run) == (23, 23, 1.0, 30)
        assert r.train_rows == [(where[i + 1], 23)]
    for i in edited:
        r = by_row[i + 1]
        # 23 - 8 = 15 shared: 15/23 = 0.652 >= 0.5. Longest run: grams 0..7 = 8 grams = 15 words (the prompt).
        assert (r.shared, r.fraction, r.longest_run) == (15, round(15 / 23, 4), 15)
        assert eval_rows[i]["prompt"].startswith(r.snippet.removesuffix("..."))
        assert r.train_rows == [(where[i + 1], 15)]
    for r in report.rows:
        if r.row - 1 not in verbatim + edited:
            assert (r.shared, r.fraction, r.train_rows, r.contaminated) == (0, 0.0, [], False)


def test_contamination_short_eval_text_is_one_gram(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "alpha beta gamma delta epsilon zeta"}])
    ev = write_jsonl(tmp_path / "e.jsonl", [{"text": "Beta, gamma delta!"}, {"text": "gamma beta"}])
    rows = contamination(train, ev).rows  # n = 8 > 3 words: the whole text must appear as a run of words
    assert [(r.ngrams, r.fraction, r.snippet) for r in rows] == [(1, 1.0, "beta gamma delta"), (1, 0.0, "")]


def test_contamination_gate_cli(tmp_path, capsys):
    train, ev, clean, *_ = _contamination_files(tmp_path)
    assert run_cli(["data", "contamination", "--train", train, "--eval", ev, "--fail-on-leak"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "7 of 12 eval rows" in out
    assert run_cli(["data", "contamination", "--train", train, "--eval", ev]) == 0  # a report, not a gate
    assert "warning" in capsys.readouterr().out
    assert run_cli(["data", "contamination", "--train", train, "--eval", clean, "--fail-on-leak"]) == 0
    assert "no leak" in capsys.readouterr().out
    assert run_cli(["data", "contamination", "--train", train, "--eval", ev, "--fail-on-leak", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert (data["contaminated"], data["eval_rows"], data["failed"], data["n"]) == (7, 12, True, 8)


# ------------------------------------------------------------------------------------------------------ audit

def test_audit_warns_on_small_and_large_bins(tmp_path, capsys):
    rows = [{"category": "a"}] + [{"category": "b"}] * 25 + [{"category": "c"}] * 24  # 2%, 50%, 48%
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    report = audit(path, "category")
    assert [(b.value, b.count, b.share) for b in report.bins] == [("b", 25, 0.5), ("c", 24, 0.48), ("a", 1, 0.02)]
    assert len(report.warnings) == 3 and report.missing == 0
    assert "'a' is 2.0% of rows, under 5%" in report.warnings[2]
    assert "'b' is 50.0% of rows, over 40%" in report.warnings[0]
    assert audit(path, "category", min_share=0.01, max_share=0.5).warnings == []  # thresholds are inclusive
    assert run_cli(["data", "audit", path, "--field", "category"]) == 0  # warnings, not an error
    out = capsys.readouterr().out
    assert out.count("warning:") == 3 and "48.0%" in out


def test_audit_nested_field_and_missing_bin(tmp_path, capsys):
    rows = [{"meta": {"source": "x"}}] * 3 + [{"meta": {"source": 1}}, {"meta": {}}, {"meta": {"source": None}}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    assert run_cli(["data", "audit", path, "--field", "meta.source", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(b["value"], b["count"]) for b in data["bins"]] == [("x", 3), (1, 1), ("(missing)", 2)]
    assert data["missing"] == 2 and "2 of 6 rows have no 'meta.source'" in data["warnings"][-1]
    with pytest.raises(DataError, match="no row has this field"):
        audit(path, "meta.nothing")


# -------------------------------------------------------------------------------------------------- agreement

# Confusion of rater a (rows) against b (columns), labels (C, R): [[4, 1], [2, 3]].
A = ["C"] * 5 + ["R"] * 5
B = ["C"] * 4 + ["R"] + ["C"] * 2 + ["R"] * 3


def test_cohen_kappa_by_hand():
    k = cohen_kappa(A, B)
    # p_o = (4 + 3) / 10 = 0.7; a says C 5/10, b says C 6/10: p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.5;
    # kappa = (0.7 - 0.5) / (1 - 0.5) = 0.4 exactly, the top of Landis & Koch's "fair" band (0.21-0.40).
    assert (k.n, k.p_o, k.p_e, k.kappa, k.interpretation) == (10, 0.7, 0.5, 0.4, "fair")
    assert cohen_kappa(A, A).kappa == 1.0 and cohen_kappa(A, A).interpretation == "almost perfect"
    same = cohen_kappa(["x"] * 4, ["x"] * 4)  # p_e = 1: 0/0, reported as 1 with a note
    assert (same.kappa, same.p_e) == (1.0, 1.0) and "undefined" in same.note
    assert cohen_kappa(["C", "R"], ["R", "C"]).kappa == -1.0  # p_o 0, p_e 0.5
    assert [landis_koch(x) for x in (-0.1, 0.0, 0.2, 0.21, 0.6, 0.61, 0.8, 0.81, 1.0)] == [
        "poor", "slight", "slight", "fair", "moderate", "substantial", "substantial", "almost perfect",
        "almost perfect"]


def test_agreement_three_raters(tmp_path, capsys):
    # c equals a but has no label on rows 1 and 10. On rows 2..9: b = C C C R C C R R, c = C C C C R R R R:
    # p_o = 5/8, b says C 5/8, c says C 4/8: p_e = 5/8 * 1/2 + 3/8 * 1/2 = 1/2, kappa(b, c) = (1/8) / (1/2) = 0.25.
    to_num = {"C": 1, "R": 2}  # labels can be any hashable values
    rows = [{"a": to_num[x], "b": to_num[y], **({} if i in (0, 9) else {"c": to_num[x]})}
            for i, (x, y) in enumerate(zip(A, B))]
    path = write_jsonl(tmp_path / "labels.jsonl", rows)
    report = agreement(path, ["a", "b", "c"])
    assert report.matrix == [[1.0, 0.4, 1.0], [0.4, 1.0, 0.25], [1.0, 0.25, 1.0]]
    assert [(p.raters, p.n, p.skipped) for p in report.pairs] == [(("a", "b"), 10, 0), (("a", "c"), 8, 2),
                                                                   (("b", "c"), 8, 2)]
    assert report.mean_kappa == pytest.approx((0.4 + 1.0 + 0.25) / 3)  # 0.55: moderate
    assert report.interpretation == "moderate"
    assert run_cli(["data", "agreement", path, "--raters", "a,b,c"]) == 0
    out = capsys.readouterr().out
    assert "kappa matrix" in out and "0.250" in out and "moderate" in out
    assert run_cli(["data", "agreement", path, "--raters", "a,b", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pairs"][0]["kappa"] == 0.4
    with pytest.raises(ConfigError):
        agreement(path, ["a"])
    with pytest.raises(DataError) as err:
        agreement(path, ["a", "z"])
    assert err.value.field == "z"


# ------------------------------------------------------------------------------------------------ length bias

def test_length_bias_by_hand(tmp_path, capsys):
    w = lambda n: " ".join(["word"] * n)  # noqa: E731
    rows = [
        {"prompt": "q1", "chosen": w(5), "rejected": w(3)},                                     # longer
        {"prompt": [{"role": "user", "content": "q2"}],
         "chosen": [{"role": "assistant", "content": w(2)}], "rejected": w(6)},                # shorter
        {"chosen": f"\n\nHuman: q3\n\nAssistant: {w(4)}", "rejected": "\n\nHuman: q3\n\nAssistant: a b c d"},
        {"prompt": "q4", "chosen": w(7), "rejected": w(1)},                                     # longer
        {"prompt": "q5", "chosen": "same", "rejected": "same"},  # no preference: left out and reported
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    r = length_bias(path)
    # chosen 5, 2, 4, 7 (mean 4.5, median 4.5); rejected 3, 6, 4, 1 (mean 3.5, median 3.5).
    assert (r.pairs, r.chosen_mean, r.chosen_median, r.rejected_mean, r.rejected_median) == (4, 4.5, 4.5, 3.5, 3.5)
    assert (r.chosen_longer, r.chosen_shorter, r.equal) == (0.5, 0.25, 0.25)
    assert r.longer_wins_accuracy == 0.625  # (2 + 0.5 * 1) / 4
    assert "62.5% by length alone (the longer answer wins" in r.verdict
    assert [s[0] for s in r.skipped] == [5]
    assert length_bias(path, unit="chars").lengths[0] == (1, 24, 14)  # 5 * 4 letters + 4 spaces; 3 * 4 + 2
    assert run_cli(["data", "length-bias", path]) == 0
    out = capsys.readouterr().out
    assert "62.5%" in out and "1 bad pairs left out" in out
    assert run_cli(["data", "length-bias", path, "--unit", "chars", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["unit"] == "chars"


def test_dedup_cli(tmp_path, capsys):
    src = write_jsonl(tmp_path / "train.jsonl", _dedup_rows())
    out = tmp_path / "clean.jsonl"
    assert run_cli(["data", "dedup", src, "--out", str(out)]) == 0
    text_out = capsys.readouterr().out
    assert "10 rows, 7 kept" in text_out and "removed rows" in text_out
    assert json.loads((tmp_path / "clean.report.json").read_text())["kept"] == 7
    assert run_cli(["data", "dedup", src, "--out", str(out), "--threshold", "0.7", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["kept"], data["exact"], data["near"]) == (6, 2, 2)
    assert len(out.read_text().splitlines()) == 6
