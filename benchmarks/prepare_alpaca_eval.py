"""Write the AlpacaEval SFT split used in RESULTS.md: GPT-4 answers as demonstrations, 700 train / 105 held out.

    python benchmarks/prepare_alpaca_eval.py [--src ../shared/data/alpaca-eval/gpt4_vs_davinci003_annotations.json]

The split is a fixed-seed shuffle of the 805 instructions, so every run sees the same 105 held-out rows.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DEFAULT_SRC = Path(__file__).resolve().parents[2] / "shared/data/alpaca-eval/gpt4_vs_davinci003_annotations.json"


def rows(src: Path) -> list[dict]:
    data = json.loads(src.read_text())
    out = []
    for item in data:
        out.append({"messages": [{"role": "user", "content": item["instruction"]},
                                 {"role": "assistant", "content": item["output_2"]}]})  # output_2 = GPT-4
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", type=Path, default=DEFAULT_SRC)
    ap.add_argument("--out", type=Path, default=Path("runs/data"))
    ap.add_argument("--train", type=int, default=700)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    data = rows(args.src)
    random.Random(args.seed).shuffle(data)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, part in (("alpaca-eval-train.jsonl", data[:args.train]),
                       ("alpaca-eval-heldout.jsonl", data[args.train:])):
        (args.out / name).write_text("".join(json.dumps(r) + "\n" for r in part))
        print(f"{args.out / name}: {len(part)} rows")


if __name__ == "__main__":
    main()
