"""The calculator task, end to end: held-out answer accuracy of the embedded model on generated arithmetic word
problems (multi-digit operands, 1-3 operations) in three settings, measured on the same held-out questions:

1. the base model without the tool (its own chat template, a plain answer), and with it (it never saw the tool);
2. after SFT on tool-use demonstrations (``examples/sft-arith-tools.yaml``);
3. after multi-turn GRPO in the calculator environment from that SFT adapter (``examples/grpo-arith-tools.yaml``).

Every answer is one greedy trajectory, verified against the generated answer (``envs`` verifier ``number``).

    .venv/bin/python benchmarks/arith_agent.py --out runs/arith-agent [--eval 100] [--grpo-steps 20]
        [--sft-epochs 2] [--grpo-lr 2e-5] [--skip base]

Writes OUT/results.json, OUT/report.html (the accuracies as bars and a table, next to links to the runs'
reports), and the runs OUT/sft and OUT/grpo (their report.html and trajectories). ``--skip base sft grpo`` only
rewrites the report from OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def accuracy(model_dir: str | None, rows: list[dict[str, Any]], *, tools: bool, max_new_tokens: int,
             batch: int) -> dict[str, float]:
    from posttrain.data.templates import template_text
    from posttrain.envs import make_environment
    from posttrain.methods.agent import AgentSetup, agent_eval
    from posttrain.runs import load_for_inference

    loaded = load_for_inference(None, model_dir)
    env = make_environment("tools", {"tools": ["calculator"] if tools else [], "verifier": "number",
                                     "max_turns": 5})
    setup = AgentSetup(env, "hermes" if tools else None, template_text("hermes-tools") if tools else None, 768)
    t0 = time.perf_counter()
    out = agent_eval(loaded.model, loaded.tokenizer, rows, setup, max_new_tokens, batch)
    out["eval/seconds"] = time.perf_counter() - t0
    return out


def write_report(out: Path, results: dict[str, Any]) -> Path:
    from posttrain.io import atomic_write_text
    from posttrain.report.html import page, table
    from posttrain.report.svg import eval_bars_svg

    columns = list(results)
    rows = {"accuracy": {c: results[c]["eval/reward"] for c in columns},
            "tool calls per question": {c: results[c]["eval/tool_calls"] for c in columns},
            "cut at the token budget": {c: results[c]["eval/cut"] for c in columns}}
    chart = eval_bars_svg({"columns": columns, "rows": rows,
                           "higher_is_better": {"accuracy": True, "cut at the token budget": False}})
    cells = [[c, f"{results[c]['eval/reward']:.2f}", f"{results[c]['eval/tool_calls']:.2f}",
              f"{results[c]['eval/turns']:.2f}", f"{results[c]['eval/cut']:.2f}"] for c in columns]
    links = [f'<p><a href="{name}/report.html">{name} run report</a></p>' for name in ("sft", "grpo")
             if (out / name / "report.html").exists()]
    html = page("The calculator task", ["<h1>The calculator task: held-out accuracy</h1>", chart,
                                        table(["setting", "accuracy", "tool calls", "turns", "cut"], cells), *links])
    atomic_write_text(out / "report.html", html)
    return out / "report.html"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/arith-agent")
    ap.add_argument("--eval", type=int, default=100, help="held-out questions")
    ap.add_argument("--demos", type=int, default=300)
    ap.add_argument("--sft-epochs", type=float, default=2)
    ap.add_argument("--grpo-steps", type=int, default=20)
    ap.add_argument("--grpo-lr", type=float, default=None, help="default: examples/grpo-arith-tools.yaml's")
    ap.add_argument("--skip", nargs="*", default=[], choices=["base", "sft", "grpo"])
    args = ap.parse_args()

    from posttrain.config import load_config
    from posttrain.curate import write_arithmetic
    from posttrain.recipes import RECIPES

    out = Path(args.out)
    data = out / "data"
    write_arithmetic(data, demos=args.demos)
    rows = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()][:args.eval]
    path = out / "results.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}

    def save(key: str, value: dict[str, Any]) -> None:
        results[key] = value
        path.write_text(json.dumps(results, indent=2))
        print(key, json.dumps(value))

    if "base" not in args.skip:
        save("base, no tool", accuracy(None, rows, tools=False, max_new_tokens=128, batch=32))
        save("base, calculator", accuracy(None, rows, tools=True, max_new_tokens=64, batch=32))
    if "sft" not in args.skip:
        cfg = load_config(str(REPO / "examples/sft-arith-tools.yaml"),
                          [f"data.train={data / 'sft.jsonl'}", f"output_dir={out / 'sft'}",
                           f"train.epochs={args.sft_epochs}"], method="sft")
        t0 = time.perf_counter()
        RECIPES["sft"].run(cfg)
        save("sft, calculator", {**accuracy(str(out / "sft"), rows, tools=True, max_new_tokens=64, batch=32),
                                 "train/seconds": time.perf_counter() - t0})
    if "grpo" not in args.skip:
        cfg = load_config(str(REPO / "examples/grpo-arith-tools.yaml"),
                          [f"data.train={data / 'train.jsonl'}", f"data.eval={data / 'test.jsonl'}",
                           f"output_dir={out / 'grpo'}", f"model.init_adapter={out / 'sft'}",
                           f"train.max_steps={args.grpo_steps}", f"train.eval_every={args.grpo_steps}",
                           *([f"train.lr={args.grpo_lr}"] if args.grpo_lr else [])],
                          method="grpo")
        t0 = time.perf_counter()
        RECIPES["grpo"].run(cfg)
        save("sft + grpo, calculator", {**accuracy(str(out / "grpo"), rows, tools=True, max_new_tokens=64, batch=32),
                                        "train/seconds": time.perf_counter() - t0})
    if results:
        print("report:", write_report(out, results))


if __name__ == "__main__":
    main()
