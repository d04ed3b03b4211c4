"""One yardstick for preference runs of any loss on the HH held-out pairs: DPO's implicit-reward accuracy.

A pair counts as ranked right when the trained policy raised the chosen response's log-prob relative to the base
model by more than the rejected one's: (log pi(y_w) - log pi_base(y_w)) - (log pi(y_l) - log pi_base(y_l)) > 0. That is
the preference accuracy ``posttrain dpo`` reports, and it needs no loss-specific reward, so DPO, KTO (trained on the
same pairs unpaired) and ORPO (reference-free in training) are measured the same way, on the same 218 pairs
(``examples/dpo-hh.yaml``'s held-out file and length policy). The base model scores 50% (every margin 0).

    .venv/bin/python benchmarks/pref_hh_table.py runs/dpo-hh runs/kto-hh runs/orpo-hh [--out runs/pref-hh.json]

Each run must be a LoRA run on the embedded model. Prints one line per run: accuracy, its standard error
sqrt(p (1 - p) / n), how many standard errors above 50% it is, and the mean margin.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def yardstick(run: Path) -> dict[str, Any]:
    from posttrain.config import load_config
    from posttrain.recipes import RECIPES

    # dpo.loss=dpo whatever the run trained with: the metric is the DPO implicit reward against the base model.
    cfg = load_config(str(REPO / "examples/dpo-hh.yaml"), [f"output_dir={run}", "dpo.loss=dpo",
                                                            "dpo.precompute_ref=false"], method="dpo")
    out = RECIPES["dpo"].evaluate_run(cfg, run)
    p, n = out["eval/accuracy"], out["pairs"]
    se = math.sqrt(p * (1 - p) / n) if n else float("nan")
    return {"run": str(run), "pairs": n, "accuracy": p, "right": round(p * n), "se": se,
            "se_above_chance": (p - 0.5) / se if se else float("nan"), "margin": out.get("eval/rewards/margin"),
            "eval": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rows = []
    for run in args.runs:
        r = yardstick(run)
        rows.append(r)
        print(f"{run}: {r['accuracy']:.1%} ({r['right']} of {r['pairs']}), se {r['se']:.1%}, "
              f"{r['se_above_chance']:.1f} se above 50%; margin {r['margin']}", flush=True)
    if args.out:
        from posttrain.io import atomic_write_text

        atomic_write_text(args.out, json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
