"""Write the HH-RLHF preference split used in RESULTS.md: 2000 train / 312 held-out pairs (fixed-seed shuffle),
and hh-train-b.jsonl: train rows 500-999, which a reward model with data.limit: 500 never reads (the second,
watched reward model of examples/ppo-hh.yaml trains on them).

    python benchmarks/prepare_hh.py [--src ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz]

Rows stay in Anthropic's HH text format; posttrain splits out the common prompt itself.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from pathlib import Path

DEFAULT_SRC = Path(__file__).resolve().parents[2] / "shared/data/hh-rlhf/harmless-base-test.jsonl.gz"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", type=Path, default=DEFAULT_SRC)
    ap.add_argument("--out", type=Path, default=Path("runs/data"))
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with gzip.open(args.src, "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    random.Random(args.seed).shuffle(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, part in (("hh-train.jsonl", rows[:args.train]), ("hh-heldout.jsonl", rows[args.train:]),
                       ("hh-train-b.jsonl", rows[500:1000])):
        (args.out / name).write_text("".join(json.dumps(r) + "\n" for r in part))
        print(f"{args.out / name}: {len(part)} pairs")


if __name__ == "__main__":
    main()
