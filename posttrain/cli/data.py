"""``posttrain data ...``: dedup, contamination (with a gate), stratification audit, rater agreement, length bias,
Math-Shepherd step labels for a PRM, outcome pairs for an ORM from them, unpaired KTO rows from pairs, arithmetic word
problems for the calculator tool task.

Layer 9 (cli): may import any layer.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from posttrain.cli._output import console

# The names of curate.prm_labels' and curate.audit's tables, written out so that building the parser imports no
# torch (`posttrain --help` stays fast); tests/test_cli.py checks they are the tables' keys.
LABEL_CHOICES = ("hard", "soft")
STEP_SPLIT_CHOICES = ("line", "paragraph")
SOLUTION_CHOICES = ("sampled", "reference")
UNIT_CHOICES = ("chars", "words")  # curate.audit.UNITS


def _json(data: dict[str, Any]) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def _warn(out: Console, text: str) -> None:
    out.print(f"[yellow]warning:[/] {escape(text)}")


def _cmd_dedup(args: argparse.Namespace) -> int:
    from posttrain import curate

    report_path = args.report or Path(args.out).with_suffix(".report.json")
    report = curate.dedup_file(args.file, args.out, threshold=args.threshold, shingle=args.shingle,
                               report_path=report_path)
    if args.json:
        _json(report.to_dict())
        return 0
    out = console()
    out.print(f"{escape(report.file)}: {report.rows} rows, [bold]{report.kept} kept[/], {report.exact} exact and "
              f"{report.near} near duplicates removed (Jaccard of word {report.shingle}-grams >= {report.threshold})")
    if report.removed:
        table = Table(title="removed rows")
        for col in ("row", "duplicate of", "kind", "Jaccard", "MinHash estimate"):
            table.add_column(col, justify="left" if col == "kind" else "right")
        for r in report.removed[:args.show]:
            table.add_row(str(r.row), str(r.duplicate_of), r.kind, f"{r.similarity:.3f}", f"{r.estimate:.3f}")
        out.print(table)
        if len(report.removed) > args.show:
            out.print(f"... {len(report.removed) - args.show} more in the report")
    out.print(f"kept rows: {escape(str(args.out))}; report: {escape(str(report_path))}")
    return 0


def _cmd_contamination(args: argparse.Namespace) -> int:
    from posttrain import curate

    report = curate.contamination(args.train, args.eval, n=args.n, threshold=args.threshold)
    leaks = report.contaminated
    failed = bool(leaks) and args.fail_on_leak
    if args.json:
        _json({**report.to_dict(), "failed": failed})
        return 1 if failed else 0
    out = console()
    shown = leaks or sorted(report.rows, key=lambda r: -r.fraction)[:5]  # no leak: the closest rows
    table = Table(title="contaminated eval rows" if leaks else "eval rows closest to the training data")
    for col in ("eval row", "shared n-grams", "longest run (words)", "train rows (shared)", "shared text"):
        table.add_column(col, justify="left" if col in ("shared text", "train rows (shared)") else "right")
    for r in shown:
        table.add_row(str(r.row), f"{r.fraction:.1%} ({r.shared}/{r.ngrams})", str(r.longest_run),
                      ", ".join(f"{t} ({c})" for t, c in r.train_rows) or "-", escape(r.snippet) or "-")
    out.print(table)
    verdict = (f"{len(leaks)} of {len(report.rows)} eval rows in {escape(report.eval)} share >= "
               f"{report.threshold:.0%} of their word {report.n}-grams with {escape(report.train)} "
               f"({report.train_rows} rows)")
    if failed:
        out.print(f"[bold red]FAILED[/]: {verdict}; remove them from one side before training or evaluating")
    elif leaks:
        out.print(f"[yellow]warning:[/] {verdict} (--fail-on-leak makes this an error)")
    else:
        out.print(f"[green]no leak[/]: {verdict}")
    return 1 if failed else 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from posttrain import curate

    report = curate.audit(args.file, args.field, min_share=args.min_share, max_share=args.max_share)
    if args.json:
        _json(report.to_dict())
        return 0
    out = console()
    table = Table(title=f"{escape(report.file)}: {report.rows} rows by {escape(report.field)}")
    table.add_column("value")
    table.add_column("rows", justify="right")
    table.add_column("share", justify="right")
    for b in report.bins:
        flag = b.value != curate.MISSING and not report.min_share <= b.share <= report.max_share
        share = f"{b.share:.1%}"
        table.add_row(escape(str(b.value)), str(b.count), f"[yellow]{share}[/]" if flag else share)
    out.print(table)
    for w in report.warnings:
        _warn(out, w)
    return 0


def _cmd_agreement(args: argparse.Namespace) -> int:
    from posttrain import curate

    raters = [r.strip() for r in args.raters.split(",") if r.strip()]
    report = curate.agreement(args.file, raters)
    if args.json:
        _json(report.to_dict())
        return 0
    out = console()
    table = Table(title="Cohen's kappa per pair of raters")
    for col in ("raters", "items", "skipped", "p_o", "p_e", "kappa", "Landis & Koch"):
        table.add_column(col, justify="left" if col in ("raters", "Landis & Koch") else "right")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for p in report.pairs:
        table.add_row(escape(" / ".join(p.raters)), str(p.n), str(p.skipped), fmt(p.p_o), fmt(p.p_e),
                      fmt(p.kappa), p.interpretation)
    out.print(table)
    if len(raters) > 2:
        matrix = Table(title="kappa matrix")
        matrix.add_column("")
        for r in raters:
            matrix.add_column(escape(r), justify="right")
        for r, values in zip(raters, report.matrix):
            matrix.add_row(escape(r), *(fmt(v) for v in values))
        out.print(matrix)
    for p in report.pairs:
        if p.note:
            out.print(f"note ({escape(' / '.join(p.raters))}): {escape(p.note)}")
    out.print(f"mean kappa over {len(report.pairs)} pair(s): [bold]{fmt(report.mean_kappa)}[/] "
              f"({report.interpretation})")
    return 0


def _cmd_length_bias(args: argparse.Namespace) -> int:
    from posttrain import curate

    report = curate.length_bias(args.file, unit=args.unit)
    if args.json:
        _json(report.to_dict())
        return 0
    out = console()
    table = Table(title=f"{escape(report.file)}: {report.pairs} pairs, response length in {report.unit}")
    for col in ("", "mean", "median"):
        table.add_column(col, justify="right" if col else "left")
    table.add_row("chosen", f"{report.chosen_mean:.1f}", f"{report.chosen_median:g}")
    table.add_row("rejected", f"{report.rejected_mean:.1f}", f"{report.rejected_median:g}")
    out.print(table)
    out.print(f"chosen is longer in {report.chosen_longer:.1%} of pairs, shorter in {report.chosen_shorter:.1%}, "
              f"equal in {report.equal:.1%}; \"longer answer wins\" is right on {report.longer_wins_accuracy:.1%} "
              "(ties count half)")
    out.print(f"[bold]{report.verdict}[/]")
    if report.skipped:
        shown = "; ".join(f"row {n}: {why}" for n, why in report.skipped[:3])
        _warn(out, f"{len(report.skipped)} bad pairs left out (no preference to learn): {shown}"
                   + (" ..." if len(report.skipped) > 3 else ""))
    return 0


def _cmd_prm_labels(args: argparse.Namespace) -> int:
    from posttrain.curate.prm_labels import PRMSettings, label_file, meta_path, prepare
    from posttrain.models.loading import load_model
    from posttrain.rollout.interface import HFEngine

    settings = PRMSettings(model=args.model, k=args.k, temperature=args.temperature,
                           max_new_tokens=args.max_new_tokens, seed=args.seed, label=args.label,
                           step_split=args.step_split, batch_size=args.batch_size, solution=args.solution)
    # The input and an existing output are checked before the model loads: a bad row fails in a second.
    job = prepare(args.input, args.out, settings, question_field=args.question_field, answer_field=args.answer_field,
                  system_prompt=args.system_prompt, limit=args.limit, resume=args.resume)
    out = console()
    if job.torn:
        _warn(out, f"{args.out} ended in a torn row (an interrupted write); it was dropped and is labelled again")
    if job.resumed:
        out.print(f"resuming {escape(str(args.out))}: {job.resumed} rows written, "
                  f"{len(job.questions) - job.start} input rows to go")
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    report = label_file(job, HFEngine(loaded.model, loaded.tokenizer), loaded.tokenizer,
                        progress=None if args.json else lambda line: out.print(escape(line)))
    if args.json:
        _json(report.to_dict())
        return 0
    out.print(f"{report.questions} questions labelled in {report.wall_s:.1f} s ({report.s_per_row:.1f} s a row): "
              f"{report.steps} steps, {report.rollouts} rollouts, {report.generated_tokens} tokens sampled; "
              f"{report.steps_reaching_answer} steps reach the answer, {report.solutions_correct} solutions are right")
    if report.skipped_empty:
        _warn(out, f"{len(report.skipped_empty)} empty solutions (no step) skipped, input rows "
                   f"{', '.join(map(str, report.skipped_empty))}")
    out.print(f"[bold]{report.rows} rows[/] in {escape(report.out)}; cost record: {escape(str(meta_path(report.out)))}")
    return 0


def _cmd_outcome_pairs(args: argparse.Namespace) -> int:
    from posttrain.curate.outcome_pairs import outcome_pairs

    report = outcome_pairs(args.files, args.out)
    if args.json:
        _json(report.to_dict())
        return 0
    out = console()
    out.print(f"{report.questions} questions: [bold]{report.pairs} pairs[/] ({report.chosen_sampled} with a sampled "
              f"chosen solution), {report.all_correct} all correct and {report.all_wrong} all wrong (no pair), "
              f"{report.empty} empty rows skipped; pairs in {escape(report.out)}")
    if not report.pairs:
        _warn(out, "no question has both a right and a wrong solution: there is nothing for an ORM to learn")
    return 0


def _cmd_unpair(args: argparse.Namespace) -> int:
    from posttrain.curate.unpair import unpair
    from posttrain.data.unpaired import balance_line, imbalance_note

    counts = unpair(args.file, args.out)
    if args.json:
        _json(counts)
        return 0
    out = console()
    out.print(f"{escape(counts['in'])}: {counts['pairs']} pairs, [bold]{counts['rows'] // 2} unpaired[/] into two "
              f"rows each, {counts['identical']} identical and {counts['bad']} bad skipped")
    out.print(escape(balance_line(counts["out"], counts["rows"], counts["desirable"], counts["undesirable"])))
    if counts["identical"]:
        _warn(out, "identical pairs skipped (chosen and rejected say the same, so neither label fits): rows "
                   + ", ".join(map(str, counts["identical_rows"][:10])) + (" ..." if counts["identical"] > 10 else ""))
    if counts["bad"]:
        shown = "; ".join(f"row {b['row']}: {b['problem']}" for b in counts["bad_rows"][:3])
        _warn(out, f"{counts['bad']} bad pairs skipped: {shown}" + (" ..." if counts["bad"] > 3 else ""))
    if note := imbalance_note(counts["desirable"], counts["undesirable"]):
        _warn(out, note)
    return 0


def _cmd_arithmetic(args: argparse.Namespace) -> int:
    from posttrain import curate
    from posttrain.curate.arithmetic import FILES

    sizes = curate.write_arithmetic(args.out, train=args.train, test=args.test, demos=args.demos, seed=args.seed)
    files = {FILES[name]: n for name, n in sizes.items()}
    if args.json:
        _json({"out": str(args.out), "seed": args.seed, "files": files})
        return 0
    out = console()
    for name, n in files.items():
        out.print(f"{escape(str(Path(args.out) / name))}: {n} rows")
    out.print(f"{escape(str(Path(args.out) / 'meta.json'))}: sizes, seed {args.seed} and the step mix")
    return 0


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number above 0 (K rollouts need sampling), got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text}")
    return value


def add_commands(sub) -> None:
    """Add ``data`` and its subcommands to the main parser's subcommands."""
    data = sub.add_parser("data", help="data curation: dedup, contamination gate, stratification audit, rater "
                                       "agreement, length bias, PRM step labels, ORM pairs, KTO rows, "
                                       "arithmetic problems")
    dsub = data.add_subparsers(dest="data_command", required=True)

    d = dsub.add_parser("dedup", help="drop exact and near duplicates (MinHash over word n-grams), keep the first")
    d.add_argument("file")
    d.add_argument("--out", required=True, help="JSONL of the kept rows, unchanged and in order (written atomically)")
    d.add_argument("--threshold", type=_fraction, default=0.8,
                   help="Jaccard of the word-shingle sets at or above which a row is a near duplicate")
    d.add_argument("--shingle", type=int, default=5, help="words per shingle")
    d.add_argument("--report", default=None, help="JSON report of the removed rows (default: OUT with .report.json)")
    d.add_argument("--show", type=int, default=20, help="removed rows shown in the table")
    d.add_argument("--json", action="store_true", help="print the report as JSON")
    d.set_defaults(func=_cmd_dedup)

    c = dsub.add_parser("contamination", help="eval rows whose word n-grams appear in the training data; "
                                              "with --fail-on-leak a gate")
    c.add_argument("--train", required=True)
    c.add_argument("--eval", required=True)
    c.add_argument("--n", type=int, default=8, help="words per n-gram")
    c.add_argument("--threshold", type=_fraction, default=0.5,
                   help="share of an eval row's n-grams found in training at which it counts as contaminated")
    c.add_argument("--fail-on-leak", action="store_true", help="exit 1 when any eval row is contaminated")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=_cmd_contamination)

    a = dsub.add_parser("audit", help="rows per value of a field; warns on bins that are too small or too large")
    a.add_argument("file")
    a.add_argument("--field", required=True, help="field name; dots reach into nested objects (meta.source)")
    a.add_argument("--min-share", type=_fraction, default=0.05)
    a.add_argument("--max-share", type=_fraction, default=0.4)
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=_cmd_audit)

    g = dsub.add_parser("agreement", help="Cohen's kappa between raters' labels (pairwise for more than two)")
    g.add_argument("file")
    g.add_argument("--raters", required=True, help="comma-separated fields holding each rater's label, e.g. a,b,c")
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=_cmd_agreement)

    b = dsub.add_parser("length-bias", help="how well response length alone predicts chosen vs rejected")
    b.add_argument("file")
    b.add_argument("--unit", choices=UNIT_CHOICES, default="words")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=_cmd_length_bias)

    r = dsub.add_parser("prm-labels", help="step labels for a process reward model (Math-Shepherd): K rollouts from "
                                           "every step of a sampled solution, checked against the reference")
    r.add_argument("input", help="JSONL of questions with a reference answer ('... #### 72')")
    r.add_argument("--out", required=True, help="JSONL of labelled solutions, a row appended as each is done")
    r.add_argument("--resume", action="store_true", help="continue an existing --out written with the same "
                                                         "settings (without it, an existing --out is refused)")
    r.add_argument("--model", default="embedded", help="model folder, GGUF file or hub id (default: the embedded "
                                                       "SmolLM2-135M-Instruct)")
    r.add_argument("--k", type=int, default=4, help="rollouts from every step prefix")
    r.add_argument("--temperature", type=_positive, default=0.8)
    r.add_argument("--max-new-tokens", type=int, default=128, help="budget of the solution and of every rollout")
    r.add_argument("--label", choices=LABEL_CHOICES, default="hard",
                   help="hard: 1 when any rollout reaches the answer; soft: the share that do")
    r.add_argument("--step-split", choices=STEP_SPLIT_CHOICES, default="line",
                   help="steps are non-empty lines, or blank-line separated paragraphs")
    r.add_argument("--solution", choices=SOLUTION_CHOICES, default="sampled",
                   help="sampled: label a solution the model samples (Math-Shepherd); reference: label the row's "
                        "reference solution (steps right by construction: the positives a weak model lacks)")
    r.add_argument("--limit", type=int, default=None, help="the first N input rows")
    r.add_argument("--seed", type=int, default=0, help="with the row number, seeds every sample of a row")
    r.add_argument("--question-field", default="question")
    r.add_argument("--answer-field", default="answer")
    r.add_argument("--system-prompt", default=None, help="put before every question (then a row's prompt is the "
                                                         "chat messages)")
    r.add_argument("--batch-size", type=int, default=64, help="completions per forward pass")
    r.add_argument("--dtype", default="auto")
    r.add_argument("--device", default="auto")
    r.add_argument("--json", action="store_true", help="print the cost record as JSON")
    r.set_defaults(func=_cmd_prm_labels)

    o = dsub.add_parser("outcome-pairs", help="preference pairs for an outcome reward model from prm-labels files: "
                                              "a right solution chosen over a wrong one of the same question")
    o.add_argument("files", nargs="+", help="JSONL written by prm-labels (e.g. a reference and a sampled file of "
                                            "the same questions: rows join by their source row)")
    o.add_argument("--out", required=True, help="JSONL of prompt/chosen/rejected pairs for `posttrain reward` "
                                                "(written atomically)")
    o.add_argument("--json", action="store_true", help="print the counts as JSON")
    o.set_defaults(func=_cmd_outcome_pairs)

    u = dsub.add_parser("unpair", help="unpaired rows for KTO from preference pairs: the chosen response labelled "
                                       "true, the rejected one false, after the same prompt")
    u.add_argument("file", help="pair file in any format `posttrain dpo` reads (prompt/chosen/rejected or HH-style)")
    u.add_argument("--out", required=True, help="JSONL of prompt/completion/label rows with provenance "
                                                "(written atomically)")
    u.add_argument("--json", action="store_true", help="print the counts as JSON")
    u.set_defaults(func=_cmd_unpair)

    w = dsub.add_parser("arithmetic", help="arithmetic word problems with 2-4 digit numbers for the calculator tool "
                                           "task: train and test prompts with answers, SFT tool-call demonstrations")
    w.add_argument("--out", required=True, help="folder for train.jsonl, test.jsonl, sft.jsonl and meta.json")
    w.add_argument("--train", type=int, default=2000, help="RL prompts")
    w.add_argument("--test", type=int, default=200, help="held-out eval problems")
    w.add_argument("--demos", type=int, default=300, help="SFT demonstrations with calculator calls")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--json", action="store_true", help="print the files and their rows as JSON")
    w.set_defaults(func=_cmd_arithmetic)

