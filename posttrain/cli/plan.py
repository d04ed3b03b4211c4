"""``posttrain plan``: parameters and memory of a model (``plan MODEL``), prompt-vs-fine-tune cost
(``plan cost``) and the method advisor (``plan advise``).

Layer 9 (cli): may import any layer.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from rich.columns import Columns
from rich.markup import escape
from rich.table import Table

from posttrain.cli._output import console
from posttrain.plan.advise import advise
from posttrain.plan.arch import PRESETS, load_arch
from posttrain.plan.cost import HORIZON_DAYS, plan_cost
from posttrain.plan.memory import DEFAULT_OPTIMIZER, DTYPE_BYTES, GB, OPTIMIZER_BYTES, plan_memory
from posttrain.plan.params import LINEAR_MODULES, METHODS

SUBCOMMANDS = ("show", "cost", "advise")


class _PlanParser(argparse.ArgumentParser):
    """Reads ``plan MODEL ...`` as ``plan show MODEL ...``.

    Sizing a model is what ``plan`` is for, so it should not need a subcommand name; argparse cannot give one
    parser both a positional MODEL and subcommands, so the missing ``show`` is put back before parsing.
    """

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        if args and args[0] not in SUBCOMMANDS and args[0] not in ("-h", "--help"):
            args.insert(0, "show")
        return super().parse_known_args(args, namespace)


def _short(n: float) -> str:
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _gb(nbytes: int) -> str:
    return f"{nbytes / GB:,.2f}"


def _cmd_show(args: argparse.Namespace) -> int:
    arch = load_arch(args.model)
    plan = plan_memory(arch, args.method, r=args.r, targets=args.targets, dtype=args.dtype,
                       optimizer=args.optimizer, seq_len=args.seq, batch=args.batch,
                       checkpointing=args.checkpointing)
    if args.json:
        print(json.dumps({"arch": asdict(arch), **plan.to_dict()}, indent=2))
        return 0
    out = console()
    t = plan.trainable
    out.print(f"[bold]{escape(arch.name)}[/]: {arch.num_layers} layers, hidden {arch.hidden_size}, "
              f"{arch.num_heads} heads ({arch.num_kv_heads} KV, head_dim {arch.head_dim}), "
              f"MLP {arch.intermediate_size}, vocab {arch.vocab_size}, "
              f"{'tied' if arch.tie_word_embeddings else 'untied'} embeddings")
    out.print(f"parameters: {plan.params.total:,} ({_short(plan.params.total)})")
    targets = "all-linear" if t.targets == LINEAR_MODULES else ",".join(t.targets)
    setup = "all parameters" if t.method == "full" else f"r={t.r} on {targets}"
    out.print(f"trainable ({t.method}, {setup}): [bold]{t.total:,}[/] ({_short(t.total)}) = {t.percent:.2f}% "
              "of the model")
    if t.per_module:
        shapes = arch.linear_shapes()
        table = Table(title=f"LoRA: r x (d_in + d_out) x {arch.num_layers} layers")
        for col in ("module", "d_in x d_out", "per layer", "all layers"):
            table.add_column(col, justify="left" if col == "module" else "right")
        for m, n in t.per_module.items():
            table.add_row(m, f"{shapes[m][0]} x {shapes[m][1]}", f"{n // arch.num_layers:,}", f"{n:,}")
        table.add_row("[bold]total[/]", "", f"{t.total // arch.num_layers:,}", f"[bold]{t.total:,}[/]")
        out.print(table)
    out.print(f"memory: {plan.method}, {plan.dtype}, {plan.optimizer}, batch {plan.batch} x seq {plan.seq_len}, "
              f"checkpointing {'on' if plan.checkpointing else 'off'}")
    table = Table()
    table.add_column("component")
    table.add_column("GB", justify="right")
    for name, nbytes in plan.rows():
        table.add_row(name, _gb(nbytes))
    table.add_row("[bold]total[/]", f"[bold]{_gb(plan.total)}[/]")
    gpus = Table()
    gpus.add_column("GPU")
    gpus.add_column("fits?")
    style = {"fits": "green", "marginal": "yellow", "no": "red"}
    for label, verdict in plan.fits().items():
        gpus.add_row(label, f"[{style[verdict]}]{verdict}[/]")
    out.print(Columns([table, gpus]))
    out.print("assumptions:")
    for note in plan.assumptions:
        out.print(f"  - {escape(note)}")
    return 0


def _horizons(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated days, e.g. 30,90,365; got {text!r}") from None


def _cmd_cost(args: argparse.Namespace) -> int:
    plan = plan_cost(args.prompt_tokens, args.queries_per_day, args.price_per_mtok, args.training_cost,
                     premium_per_mtok=args.premium_per_mtok, query_tokens=args.query_tokens,
                     horizons=args.horizons)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
        return 0
    out = console()
    out.print(f"prompt overhead: {plan.prompt_tokens:,} tokens x {plan.queries_per_day:,g} queries/day x "
              f"{plan.price_per_mtok:g} per 1M tokens = [bold]{plan.daily_overhead:,.2f} per day[/]")
    if plan.daily_premium:
        out.print(f"fine-tuned premium: {plan.query_tokens:,} tokens x {plan.queries_per_day:,g} queries/day x "
                  f"{plan.premium_per_mtok:g} per 1M tokens = {plan.daily_premium:,.2f} per day")
    days = plan.break_even_days
    out.print(f"daily saving {plan.daily_saving:,.2f}; training {plan.training_cost:,.2f} breaks even "
              + (f"after [bold]{days:,.1f} days[/]" if days is not None else "[bold]never[/] (no daily saving)"))
    table = Table(title="cumulative cost (same currency as the prices)")
    for col in ("days", "prompting", "fine-tune", "saving"):
        table.add_column(col, justify="right")
    for h in plan.horizons:
        table.add_row(str(h.days), f"{h.prompting:,.2f}", f"{h.fine_tune:,.2f}", f"{h.saving:,.2f}")
    out.print(table)
    return 0


def _cmd_advise(args: argparse.Namespace) -> int:
    values = {k: getattr(args, k) for k in ("change", "stability", "goal", "examples", "vram", "model")}
    ask = input if sys.stdin is not None and sys.stdin.isatty() else None
    decisions = advise(values, ask=ask, seq_len=args.seq, batch=args.batch)
    if args.json:
        print(json.dumps([d.to_dict() for d in decisions], indent=2))
        return 0
    out = console()
    for d in decisions:
        out.print(f"[bold]{d.question}: {escape(d.choice)}[/]")
        for reason in d.reasons:
            out.print(f"  - {escape(reason)}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``plan`` (with ``show``, the default, ``cost`` and ``advise``) to the main CLI's subparsers."""
    plan = sub.add_parser("plan", help="parameters, memory and cost before training; which method to use",
                          description="posttrain plan MODEL sizes a fine-tune (same as plan show MODEL); "
                                      "plan cost compares prompt overhead with a fine-tune; plan advise picks "
                                      "an approach and a method.")
    plan.__class__ = _PlanParser  # adds one method, no state: see _PlanParser
    # parser_class: the subcommands must not inherit the rewrite (they would default to the class of `plan`).
    psub = plan.add_subparsers(dest="plan_command", required=True, metavar="{MODEL,show,cost,advise}",
                               parser_class=argparse.ArgumentParser)

    s = psub.add_parser("show", help="trainable parameters, memory and fitting GPUs (default)")
    s.add_argument("model", help=f"config.json, model folder or preset ({', '.join(PRESETS)})")
    s.add_argument("--method", choices=METHODS, default="lora")
    s.add_argument("--r", type=int, default=16, help="LoRA rank")
    s.add_argument("--targets", default="q_proj,v_proj", help="comma-separated modules, or all-linear")
    s.add_argument("--batch", type=int, default=1, help="micro-batch size (sequences)")
    s.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    s.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="activation checkpointing per decoder layer (default: on)")
    s.add_argument("--optimizer", choices=tuple(OPTIMIZER_BYTES), default=None,
                   help="default: " + ", ".join(f"{m}: {o}" for m, o in DEFAULT_OPTIMIZER.items()))
    s.add_argument("--dtype", choices=tuple(DTYPE_BYTES), default="bf16")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_show)

    c = psub.add_parser("cost", help="prompt overhead per query vs a one-time fine-tune: break-even day")
    c.add_argument("--prompt-tokens", type=int, required=True,
                   help="prompt tokens per query that a fine-tune makes unnecessary (system prompt, few-shot)")
    c.add_argument("--queries-per-day", type=float, required=True)
    c.add_argument("--price-per-mtok", type=float, required=True, help="price per 1M input tokens")
    c.add_argument("--training-cost", type=float, required=True, help="one-time cost of the fine-tune")
    c.add_argument("--premium-per-mtok", type=float, default=0.0,
                   help="extra price per 1M tokens for serving the fine-tuned model")
    c.add_argument("--query-tokens", type=int, default=0,
                   help="tokens each query still processes (the premium applies to these)")
    c.add_argument("--horizons", type=_horizons, default=HORIZON_DAYS, help="days, e.g. 30,90,365")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=_cmd_cost)

    a = psub.add_parser("advise", help="prompt vs RAG vs fine-tune, then SFT/DPO/GRPO with full/LoRA/QLoRA; "
                                       "asks for missing answers on a terminal")
    a.add_argument("--change", choices=("behaviour", "behavior", "knowledge"), help="what must change")
    a.add_argument("--stability", choices=("stable", "volatile"), help="how often it changes")
    a.add_argument("--goal", choices=("imitate", "prefer", "verifiable"),
                   help="demonstrations (SFT), preference pairs (DPO) or checkable answers (GRPO)")
    a.add_argument("--examples", type=int, help="training examples, pairs or prompts")
    a.add_argument("--vram", type=float, help="GPU memory in GB")
    a.add_argument("--model", help="preset, config.json or model folder")
    a.add_argument("--seq", type=int, default=2048)
    a.add_argument("--batch", type=int, default=1)
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=_cmd_advise)

