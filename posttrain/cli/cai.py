"""``posttrain cai sl|rl``: Constitutional AI data, as SFT rows (critique + revise) or preference rows (AI judge).

Layer 9 (cli): may import any layer.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from rich.markup import escape

from posttrain.cli._output import console

EMBEDDED_NAME = "SmolLM2-135M-Instruct (embedded)"


def _name(model: str | None, adapter: str | None) -> str:
    base = model or (f"base of {adapter}" if adapter else EMBEDDED_NAME)
    return f"{base} + {adapter}" if adapter else base


def _setup(args: argparse.Namespace):
    from posttrain.errors import DataError
    from posttrain.judge.cai import read_prompts
    from posttrain.judge.constitution import load_constitution
    from posttrain.runs import load_for_inference

    if Path(args.out).suffix != ".jsonl":
        raise DataError(args.out, None, None, "the output is JSON lines: give it a .jsonl name")
    # Inputs are checked before the model loads, so a bad file fails in a second rather than after a load.
    prompts = read_prompts(args.prompts)[:args.limit] if args.limit else read_prompts(args.prompts)
    principles = load_constitution(args.constitution)
    loaded = load_for_inference(args.model, args.adapter, dtype=args.dtype)
    return prompts, principles, loaded


def _write(args: argparse.Namespace, rows: list[dict[str, Any]], stats: dict[str, float], dropped: list[str],
           seconds: float, hint: str) -> int:
    from posttrain.io import atomic_write_text

    atomic_write_text(Path(args.out), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    out = console()
    why = ", ".join(f"{stats[k]} {k.replace('_', ' ')}" for k in dropped if stats[k]) or "none"
    out.print(f"{stats['prompts']} prompts -> [bold]{len(rows)} rows written[/] to {escape(str(args.out))} "
              f"in {seconds:.1f} s; dropped: {why}")
    if not rows:
        out.print(f"[yellow]warning:[/] no row was written; {hint}")
        return 1
    return 0


def _cmd_sl(args: argparse.Namespace) -> int:
    from posttrain.judge.cai import sl_cai

    prompts, principles, loaded = _setup(args)
    start = time.perf_counter()
    rows, stats = sl_cai(loaded.model, loaded.tokenizer, prompts, principles, seed=args.seed,
                         max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                         model_name=_name(args.model, args.adapter))
    code = _write(args, rows, stats, ["empty_revision"], time.perf_counter() - start,
                  "every revision was empty; try a higher --max-new-tokens or another --model")
    if stats["unchanged"]:
        console().print(f"note: {stats['unchanged']} revisions repeat the first answer word for word")
    return code


def _cmd_rl(args: argparse.Namespace) -> int:
    from posttrain.judge.cai import rl_cai
    from posttrain.judge.pairwise import CalibratedJudge, ModelJudge
    from posttrain.runs import load_for_inference

    prompts, principles, loaded = _setup(args)
    if args.judge_model or args.judge_adapter:
        judged_by = load_for_inference(args.judge_model, args.judge_adapter, dtype=args.dtype)
        judge_name = _name(args.judge_model, args.judge_adapter)
    else:  # the policy judges its own samples: no second model in memory
        judged_by, judge_name = loaded, _name(args.model, args.adapter)
    judge = ModelJudge(judged_by.model, judged_by.tokenizer, name=judge_name)
    if args.calibrate:
        judge = CalibratedJudge(judge)
    start = time.perf_counter()
    rows, stats = rl_cai(loaded.model, loaded.tokenizer, prompts, principles, judge, judge_name=judge_name,
                         seed=args.seed, n_samples=args.samples, temperature=args.temperature, top_p=args.top_p,
                         max_new_tokens=args.max_new_tokens, margin=args.margin,
                         policy_model=_name(args.model, args.adapter))
    seconds = time.perf_counter() - start
    bias = stats["judge_p_slot_a"]
    if bias == bias:  # not NaN: some pair was judged
        console().print(f"judge's P(answer in slot A is better), both orders averaged: {bias:.2f} "
                         "(0.50 = no position bias)")
    mostly_order = stats["inconsistent"] > stats["kept"] + stats["ties"]
    hint = ("the judge's verdicts mostly flip with the order of the answers (position bias): use a stronger "
            "--judge-model" if mostly_order else "try more prompts, more --samples, a higher temperature or a "
            "lower --margin")
    return _write(args, rows, stats, ["ties", "inconsistent", "identical", "empty"], seconds, hint)


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"rl samples several answers per prompt, so it needs > 0 (greedy decoding "
                                         f"would make them identical); got {text}")
    return value


def _at_least_two(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"a pair needs at least 2 answers per prompt; got {text}")
    return value


def _margin(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 0.5:
        raise argparse.ArgumentTypeError(f"a margin is a probability above one half, in [0, 0.5); got {text}")
    return value


def add_commands(sub) -> None:
    """Add ``cai`` and its subcommands (``sl``, ``rl``) to the main parser's subcommands."""
    cai = sub.add_parser("cai", help="Constitutional AI data: critique-and-revise SFT rows (sl) or AI-judged "
                                     "preference rows (rl)")
    csub = cai.add_subparsers(dest="cai_command", required=True)

    def common(q: argparse.ArgumentParser, temperature: float, temperature_type=float) -> None:
        q.add_argument("prompts", help=".txt (one prompt per line) or .jsonl with 'prompt', 'messages' (last user "
                                       "turn) or 'instruction' per row")
        q.add_argument("--out", required=True, help="JSONL to write (atomically)")
        q.add_argument("--model", default=None, help="policy base model (default: the embedded SmolLM2-135M)")
        q.add_argument("--adapter", default=None, help="LoRA adapter folder or run folder for the policy")
        q.add_argument("--constitution", default=None, help="YAML of principles (default: the shipped one)")
        q.add_argument("--max-new-tokens", type=int, default=128)
        q.add_argument("--temperature", type=temperature_type, default=temperature,
                       help="0 = greedy (sl only)")
        q.add_argument("--top-p", type=float, default=0.95)
        q.add_argument("--seed", type=int, default=0, help="sampling and the principle drawn for each prompt")
        q.add_argument("--limit", type=int, default=None, help="use the first N prompts")
        q.add_argument("--dtype", default="auto")

    s = csub.add_parser("sl", help="answer, critique against a principle, revise; write (prompt, revision) SFT rows")
    common(s, 0.7)
    s.set_defaults(func=_cmd_sl)

    r = csub.add_parser("rl", help="sample answers, judge pairs in both orders against a principle; write "
                                   "preference rows (ties and order-dependent verdicts dropped)")
    common(r, 1.0, _positive)
    r.add_argument("--samples", type=_at_least_two, default=2, help="answers per prompt; every pair of them is judged")
    r.add_argument("--judge-model", default=None, help="judge base model (default: the policy itself)")
    r.add_argument("--judge-adapter", default=None, help="LoRA adapter folder or run folder for the judge")
    r.add_argument("--margin", type=_margin, default=0.0,
                   help="a winner must beat one half by more than this in both orders")
    r.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                   help="judge without first removing the judge's slot preference measured on pairs of one answer "
                        "shown twice (calibration costs two extra judge calls per answer)")
    r.set_defaults(func=_cmd_rl)
