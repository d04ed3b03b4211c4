"""What a trained PRM's held-out AUROC is made of: the same held-out steps its run scored, split into strata.

A PRM trained on Math-Shepherd labels of a small model can score well by shortcuts: the last step of a reference
solution ('#### N') is good by construction, a reference step is more often good than a sampled one, and a later
step is more often good than an earlier one (fewer steps left to finish). This scores the run's held-out split
(rebuilt exactly as its recipe built it, whole questions held out) and reports the AUROC, with its Hanley-McNeil
standard error, on every stratum, next to a scorer that sees only a step's position (its index / the solution's
length), so a number can be read against the shortcut it might be.

    .venv/bin/python benchmarks/prm_strata.py runs/prm-gsm8k
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable


def strata_table(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """AUROC of the PRM and of the position-only scorer on each stratum of ``steps`` (dicts with score, position,
    good, kind, last)."""
    from posttrain.methods.prm import auroc, auroc_se

    strata: dict[str, Callable[[dict[str, Any]], bool]] = {
        "all held-out steps": lambda s: True,
        "without each solution's last step": lambda s: not s["last"],
        "reference solutions": lambda s: s["kind"] == "reference",
        "reference solutions, without the last step": lambda s: s["kind"] == "reference" and not s["last"],
        "sampled solutions": lambda s: s["kind"] == "sampled",
    }
    rows = []
    for name, keep in strata.items():
        part = [s for s in steps if keep(s)]
        good = [s["good"] for s in part]
        n_good, n_bad = sum(good), len(good) - sum(good)
        prm = auroc([s["score"] for s in part], good)
        pos = auroc([s["position"] for s in part], good)
        rows.append({"stratum": name, "steps": len(part), "good": n_good, "prm_auroc": prm,
                     "prm_se": auroc_se(prm, n_good, n_bad), "position_auroc": pos,
                     "position_se": auroc_se(pos, n_good, n_bad)})
    return rows


def held_out_steps(run: Path) -> list[dict[str, Any]]:
    from posttrain.config import load_config
    from posttrain.data import read_rows
    from posttrain.recipes.prm import prepare_steps
    from posttrain.rewards import load_prm

    cfg = load_config(run / "config.yaml")
    prm = load_prm(run)
    _, held, _ = prepare_steps(cfg.data, cfg.prm.step_separator, prm.tokenizer)
    rows = dict(read_rows(cfg.data.train))
    chosen = [rows[e.row] for e in held]
    scores = prm.score_steps([r["prompt"] for r in chosen], [r["steps"][:len(e.labels)] for r, e in zip(chosen, held)])
    out = []
    for r, e, probs in zip(chosen, held, scores):
        n = len(e.labels)
        for i, (label, p) in enumerate(zip(e.labels, probs)):
            if label is None:
                continue
            out.append({"score": p, "position": (i + 1) / n, "good": label >= 0.5, "last": i == n - 1,
                        "kind": (r.get("provenance") or {}).get("solution")})
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| held-out stratum | steps (good) | PRM AUROC ± se | position-only AUROC ± se |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stratum']} | {r['steps']} ({r['good']}) | {r['prm_auroc']:.3f} ± {r['prm_se']:.3f} | "
                     f"{r['position_auroc']:.3f} ± {r['position_se']:.3f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a posttrain prm run folder")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = strata_table(held_out_steps(args.run))
    print(json.dumps(rows, indent=2) if args.json else markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
