"""The ``posttrain`` command: argparse only. Each subcommand parses, calls one function of a lower layer and prints.

Layer 9: may import anything; its imports sit inside the command functions so that ``posttrain --help`` starts
without loading torch."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# PEFT still calls this transformers property; the warning says nothing a user can act on.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")


def _cmd_train(args: argparse.Namespace) -> int:
    from posttrain.config import load_config
    from posttrain.engine import console
    from posttrain.engine.distributed import barrier, setup, shutdown
    from posttrain.engine.resume import Resume
    from posttrain.errors import ConfigError
    from posttrain.recipes import RECIPES

    if args.extend_steps and not args.resume:
        raise ConfigError("--extend-steps changes the length of a resumed run; it goes with --resume")
    cfg = load_config(args.config, args.overrides, method=args.command)
    if cfg.method != args.command:
        raise ConfigError(f"{args.config} is a {cfg.method!r} config; run it with `posttrain {cfg.method}`")
    w = setup()
    console.quiet = not w.main  # one log, from rank 0
    try:
        RECIPES[cfg.method].run(cfg, resume=args.resume and Resume(extend_steps=args.extend_steps))
        # Rank 0 writes the results after the others return; a rank that tore down its gloo group while rank 0
        # still held the connection was seen to abort ("terminate called without an active exception").
        barrier()
    finally:
        shutdown()
    return 0


def _chat_messages(prompt: str, system: str | None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system else []
    return [*msgs, {"role": "user", "content": prompt}]


def _cmd_generate(args: argparse.Namespace) -> int:
    from posttrain.rollout import generate
    from posttrain.runs import load_for_inference

    loaded = load_for_inference(args.model, args.adapter, dtype=args.dtype)
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    outs = generate(loaded.model, loaded.tokenizer, [_chat_messages(p, args.system) for p in prompts],
                    max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    for p, o in zip(prompts, outs):
        print(json.dumps({"prompt": p, "output": o}) if args.json else f">>> {p}\n{o}\n")
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from posttrain.rollout import generate
    from posttrain.runs import load_for_inference

    loaded = load_for_inference(args.model, args.adapter, dtype=args.dtype)
    history = [{"role": "system", "content": args.system}] if args.system else []
    print("chat: type a message; /reset clears the history, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            return 0
        if line.strip() in {"/exit", "/quit"}:
            return 0
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        reply = generate(loaded.model, loaded.tokenizer, [history], max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_p=args.top_p)[0]
        history.append({"role": "assistant", "content": reply})
        print(f"model> {reply}")


def _cmd_eval(args: argparse.Namespace) -> int:
    if args.suites:
        from posttrain.workflow import evaluate_target

        print(json.dumps(evaluate_target(args.suites, args.target, args.out, use_base=args.base,
                                         overrides=args.overrides), indent=2))
        return 0
    from posttrain.config import load_config
    from posttrain.data import eval_batches
    from posttrain.data.templates import resolve_template
    from posttrain.engine import console
    from posttrain.eval import heldout_loss, sample_generations
    from posttrain.recipes import RECIPES
    from posttrain.recipes.sft import prepare_data
    from posttrain.runs import load_for_inference, trained_model_of

    target = Path(args.target)
    run_dir = target if target.is_dir() else None
    cfg = load_config(run_dir / "config.yaml" if run_dir else target, args.overrides, method="sft")
    if cfg.method != "sft":
        if run_dir is None:
            from posttrain.errors import ConfigError

            raise ConfigError(f"posttrain eval of a {cfg.method} job needs its run folder, not a config file")
        print(json.dumps(RECIPES[cfg.method].evaluate_run(cfg, run_dir), indent=2))
        return 0
    model_name, adapter = trained_model_of(run_dir, cfg.finetune, cfg.model.name, use_base=args.base) \
        if run_dir is not None else (cfg.model.name, None)
    loaded = load_for_inference(model_name, adapter, dtype=cfg.model.dtype, device=cfg.model.device)
    _, held, held_chats, lines = prepare_data(cfg.data, loaded.tokenizer)
    if not held:
        console.print("no held-out data: set data.eval or data.eval_fraction")
        return 2
    batches = eval_batches(held, cfg.train.micro_batch_size, loaded.tokenizer.pad_token_id)
    result = {"model": model_name or "embedded", "adapter": adapter,
              **heldout_loss(loaded.model, batches, cfg.train.loss_chunk_size)}
    if args.samples:
        shown = held_chats[:args.samples]
        result["samples"] = sample_generations(loaded.model, loaded.tokenizer, [c for c, _ in shown],
                                               tools=[t for _, t in shown],
                                               chat_template=resolve_template(cfg.data.chat_template))
    print(json.dumps(result, indent=2))
    return 0


def _cmd_render_trajectory(args: argparse.Namespace) -> int:
    from rich.console import Console

    from posttrain.models import load_tokenizer
    from posttrain.rollout.multiturn import highlight_trajectory
    from posttrain.runs import run_config_of

    path = Path(args.trajectory)
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    model = args.model or (run_config_of(str(path.parent.parent)).get("model") or {}).get("name")
    tok = load_tokenizer(model)
    out = Console(highlight=False)
    out.print(f"{path}: {len(records)} trajectories; context dim, [black on green]sampled (trained)[/], "
              "[white on blue]environment (context)[/]")
    for rec in records[:args.rows]:
        sampled = sum(sum(s["sampled"]) for s in rec["segments"])
        env = sum(len(s["ids"]) for s in rec["segments"]) - sampled
        out.print(f"\n[bold]rollout {rec['rollout']}, row {rec['row']}[/]: reward {rec['reward']}, {rec['turns']} "
                  f"turns, {rec['splits']} splits, {sampled} sampled and {env} environment tokens"
                  + ("" if rec["finished"] else ", cut by the token budget"))
        out.print(highlight_trajectory(tok, rec))
    return 0


def _cmd_render(args: argparse.Namespace) -> int:
    from rich.console import Console

    from posttrain.config import load_config

    if args.trajectory:
        return _cmd_render_trajectory(args)
    if not args.config:
        raise SystemExit("posttrain render: give a config (SFT examples) or --trajectory FILE")
    from posttrain.data import build_examples, highlight
    from posttrain.data.templates import resolve_template
    from posttrain.models import load_tokenizer

    cfg = load_config(args.config, args.overrides, method="sft")
    tok = load_tokenizer(cfg.model.name)
    d = cfg.data
    examples, kept, report = build_examples(d.train, tok, fmt=d.format, system_prompt=d.system_prompt,
                                            max_seq_len=d.max_seq_len, overlong=d.overlong,
                                            chat_template=resolve_template(d.chat_template),
                                            rewritten_turns=d.rewritten_turns)
    out = Console(highlight=False)
    out.print(report.summary())
    for ex, (_, chat, _) in zip(examples[:args.rows], kept):
        calls = sum(len(m.get("tool_calls") or []) for m in chat)
        tools = f", {calls} tool calls (trained) and their results (not)" if calls else ""
        out.print(f"\n[bold]row {ex.row}[/] ({len(ex)} tokens, {ex.num_trained} trained, trained in green{tools})")
        out.print(highlight(tok, ex))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from posttrain.workflow import run_workflow

    return run_workflow(args.workflow, args.overrides)


def _cmd_compare(args: argparse.Namespace) -> int:
    from posttrain.report.compare import DEFAULT_PANELS, write_compare_report

    runs = {Path(r).resolve().name: Path(r) for r in args.runs}
    if len(runs) < len(args.runs):
        runs = {str(r): Path(r) for r in args.runs}  # two folders of one name: label them by their paths
    panels = {k: k for k in args.metric} if args.metric else DEFAULT_PANELS
    out = Path(args.out) if args.out else Path(args.runs[0]).parent / "compare.html"
    try:
        path = write_compare_report(out, runs, panels, title=args.title or "runs compared")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from posttrain.demo import main as demo_main

    return demo_main(args.output_dir, quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    from posttrain.recipes import RECIPES

    p = argparse.ArgumentParser(prog="posttrain", description="Post-training for causal language models.")
    sub = p.add_subparsers(dest="command", required=True)

    for name, recipe in RECIPES.items():
        s = sub.add_parser(name, help=recipe.help)
        s.add_argument("config")
        s.add_argument("overrides", nargs="*", help="dotted key=value, e.g. train.lr=1e-4 lora.r=8")
        s.add_argument("--resume", action="store_true",
                       help="continue from the last complete checkpoint; refused when a key that changes the result "
                            "differs from the config it was trained with (logging, eval and save intervals may change)")
        s.add_argument("--extend-steps", action="store_true",
                       help="with --resume: let train.max_steps change; the steps taken keep their lr, the rest of "
                            "the decay is re-laid from the current lr down to the floor over the new length")
        s.set_defaults(func=_cmd_train)

    def inference_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--model", default=None, help="base model (default: the run's base, else the embedded model)")
        q.add_argument("--adapter", default=None, help="LoRA adapter folder or run folder")
        q.add_argument("--system", default=None, help="system prompt")
        q.add_argument("--max-new-tokens", type=int, default=128)
        q.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        q.add_argument("--top-p", type=float, default=1.0)
        q.add_argument("--dtype", default="auto")

    g = sub.add_parser("generate", help="complete prompts with a base model or base+adapter")
    inference_args(g)
    g.add_argument("--prompt", action="append", help="repeatable; without it, one prompt per stdin line")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--json", action="store_true", help="print JSON lines")
    g.set_defaults(func=_cmd_generate)

    c = sub.add_parser("chat", help="interactive chat with a base model or base+adapter")
    inference_args(c)
    c.set_defaults(func=_cmd_chat)

    e = sub.add_parser("eval", help="held-out completion loss, perplexity and samples of a run or config; with "
                                    "--suites, a file of eval suites (a workflow's evals) on a run or a model")
    e.add_argument("target", help="a run folder (uses its config.yaml and adapter) or a config file; with --suites, "
                                  "also a model name, folder or GGUF file, or 'embedded'")
    e.add_argument("overrides", nargs="*", help="key=value: of the config, or with --suites of the suites file")
    e.add_argument("--suites", default=None, help="YAML with 'evals' (name -> {kind, data, limit, options}, as in a "
                                                  "workflow) and an optional 'system_prompt'")
    e.add_argument("--out", default=None, help="with --suites: the folder for evals.json and report.html (default: "
                                               "RUN/evals/NAME, else runs/evals/NAME)")
    e.add_argument("--base", action="store_true", help="evaluate the base model without the run's adapter")
    e.add_argument("--samples", type=int, default=3, help="held-out prompts to generate from")
    e.set_defaults(func=_cmd_eval)

    r = sub.add_parser("render", help="print rendered training examples with the trained tokens highlighted")
    r.add_argument("config", nargs="?")
    r.add_argument("overrides", nargs="*")
    r.add_argument("--rows", type=int, default=2)
    r.add_argument("--trajectory", default=None, help="a run's trajectories/rollout-N.jsonl: sampled, environment "
                                                      "and context tokens coloured")
    r.add_argument("--model", default=None, help="with --trajectory: the tokenizer (default: the run's model)")
    r.set_defaults(func=_cmd_render)

    from posttrain.cli.ship import add_commands as add_ship_commands

    add_ship_commands(sub)  # merge, export: here, so `posttrain -h` lists them after render, as before

    w = sub.add_parser("run", help="a workflow: eval set, baseline, train stages with gates, export, report.html "
                                   "(stages cached by the hash of their inputs)")
    w.add_argument("workflow", help="a workflow YAML file")
    w.add_argument("overrides", nargs="*", help="dotted key=value of the workflow file, e.g. output_dir=wf2")
    w.set_defaults(func=_cmd_run)

    cmp = sub.add_parser("compare", help="2-6 run folders side by side: their curves in one figure, the config "
                         "keys that differ, early and late means (compare.html)")
    cmp.add_argument("runs", nargs="+", help="run folders (each with metrics.jsonl)")
    cmp.add_argument("--metric", action="append", default=[], help="a metrics key to plot (repeatable; default: "
                     "loss, reward, eval/reward, eval/loss, kl, entropy, those logged)")
    cmp.add_argument("--out", help="the page to write (default: compare.html beside the first run)")
    cmp.add_argument("--title")
    cmp.set_defaults(func=_cmd_compare)

    d = sub.add_parser("demo", help="LoRA SFT of the embedded model on a generated JSON-extraction task")
    d.add_argument("--output-dir", default="demo-run")
    d.add_argument("--quick", action="store_true", help="a smaller run, for smoke tests")
    d.set_defaults(func=_cmd_demo)

    from posttrain.cli.cai import add_commands as add_cai_commands
    from posttrain.cli.data import add_commands as add_data_commands
    from posttrain.cli.plan import add_commands as add_plan_commands
    from posttrain.cli.serve import add_commands as add_serve_commands
    from posttrain.cli.ui import add_commands as add_ui_commands

    add_data_commands(sub)
    add_cai_commands(sub)
    add_plan_commands(sub)
    add_serve_commands(sub)
    add_ui_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from posttrain.errors import ConfigError, DataError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
