"""Forgetting and its mitigations, measured by out-of-domain suites, as one `posttrain run` workflow.

    .venv/bin/python benchmarks/forgetting.py [--out runs/forgetting] [--epochs 2] [--kl 0.1] [--ratio 0.2]

In-domain task: the demo's JSON contact cards (LoRA SFT, lr 1e-3, all linear layers). Four SFT stages from the same
base and data: plain, + KL-to-base (``kl_to_base``), + 20% general instructions mixed in (``data.mix``: the 175
human-written Alpaca seed tasks), + 20% replayed base-model answers (``data.replay``: the base's own answers to the
seed instructions). Out-of-domain suites, never trained on: completion loss of GPT-4's answers to 105 held-out
AlpacaEval instructions, 20 general-knowledge questions (answer contained), and 12 multiple-choice questions
(accuracy and ECE). Needs ../shared/data (a benchmark, not the project). Prints the table RESULTS.md records.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))


def main() -> int:
    from posttrain.demo import GENERAL_QA, MULTIPLE_CHOICE, make_rows
    from posttrain.workflow import run_workflow

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("runs/forgetting"))
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--kl", type=float, default=0.1)
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--ood-rows", type=int, default=105)
    args = ap.parse_args()
    data = args.out / "data"
    data.mkdir(parents=True, exist_ok=True)

    def write(name: str, rows: list[dict]) -> str:
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(data / name)

    cards = write("cards.jsonl", make_rows(200, seed=1))
    seed_rows = []
    for line in (SHARED / "alpaca-seed" / "seed_tasks.jsonl").read_text().splitlines():
        task = json.loads(line)
        inst = task["instances"][0]
        seed_rows.append({"instruction": task["instruction"], "input": inst["input"], "output": inst["output"]})
    general_mix = write("seed-tasks.jsonl", seed_rows)
    alpaca = json.loads((SHARED / "alpaca-eval" / "gpt4_vs_davinci003_annotations.json").read_text())
    ood = write("alpaca-eval-ood.jsonl", [{"messages": [{"role": "user", "content": a["instruction"]},
                                                       {"role": "assistant", "content": a["output_2"]}]}
                                         for a in alpaca[-args.ood_rows:]])
    qa = write("general-qa.jsonl", [{"prompt": q, "completion": a} for q, a in GENERAL_QA])
    mc = write("multiple-choice.jsonl", [{"question": q, "choices": c, "answer": a} for q, c, a in MULTIPLE_CHOICE])

    base_sft = {"data": {"train": "${train_set}", "eval": "${eval_set}", "max_seq_len": 1024},
                "lora": {"r": 16, "alpha": 32}, "eval_samples": 0,
                "train": {"lr": 1e-3, "epochs": args.epochs, "micro_batch_size": 2, "warmup_ratio": 0.1,
                          "log_every": 10}}
    variants = {"sft_plain": [], "sft_kl": [f"kl_to_base={args.kl}"],
                "sft_mix": [f"data.mix.path={general_mix}", f"data.mix.ratio={args.ratio}",
                            "data.overlong=drop"],  # one seed task is longer than max_seq_len; counted, not trained
                "sft_replay": [f"data.replay.prompts={general_mix}", f"data.replay.ratio={args.ratio}",
                               "data.replay.max_new_tokens=128"]}
    workflow = {
        "name": "forgetting: plain SFT vs KL-to-base, data mixing and replay",
        "output_dir": str(args.out),
        "eval_set": {"split": cards, "fraction": 0.2},
        "evals": {
            "cards": {"kind": "generation", "data": "${eval_set}", "limit": 24,
                      "options": {"scorer": "json_exact", "max_new_tokens": 48}},
            "ood_alpaca_loss": {"kind": "loss", "data": ood, "options": {"max_seq_len": 2048, "overlong": "drop"}},
            "ood_qa": {"kind": "generation", "data": qa, "options": {"scorer": "contains", "max_new_tokens": 32}},
            "ood_mc": {"kind": "multiple_choice", "data": mc},
        },
        "stages": [{"name": name, "train": "sft", "config": base_sft, "overrides": extra}
                   for name, extra in variants.items()],
    }
    path = args.out / "workflow.yaml"
    path.write_text(yaml.safe_dump(workflow, sort_keys=False, width=110))
    code = run_workflow(str(path))
    table = json.loads((args.out / "workflow.json").read_text())["evals"]
    print("| metric | " + " | ".join(table["columns"]) + " |")
    print("|---|" + "---:|" * len(table["columns"]))
    for metric, cells in table["rows"].items():
        print(f"| {metric} | " + " | ".join(f"{cells[c]:.3f}" if c in cells else "—" for c in table["columns"]) + " |")
    return code


if __name__ == "__main__":
    sys.exit(main())
