"""GRPO variants side by side on one budget: `posttrain grpo examples/grpo-gsm8k.yaml` four times, the same data,
seed, prompts, steps and sampling, changing only the variant keys, then one comparison report of their curves.

    .venv/bin/python benchmarks/grpo_variants.py            # runs what is missing (64 steps each), then the report
    .venv/bin/python benchmarks/grpo_variants.py --minutes 20 --out runs/grpo-variants-20min   # one time budget
    .venv/bin/python benchmarks/grpo_variants.py --report   # only the report (runs/grpo-variants/compare.html)

Every variant runs mu = 2 (each rollout serves two optimizer steps): at mu = 1 the ratio is exactly 1, so neither
a clip (clip-higher) nor GSPO's sequence ratio changes anything, and the comparison would only show the advantage
estimator. A run folder with a summary.json is kept, so an interrupted comparison resumes variant by variant.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "examples" / "grpo-gsm8k.yaml"
COMMON = ["grpo.mu=2"]
VARIANTS: dict[str, list[str]] = {
    "grpo": [],  # the sample std, per-completion token means, token ratio, clip 0.2
    "dr_grpo": ["grpo.advantage=dr_grpo"],  # no std, and (its published aggregation) no length normalisation
    "gspo": ["grpo.policy_loss=gspo", "grpo.clip_eps=3.0e-4", "grpo.clip_eps_high=4.0e-4"],  # the paper's ranges
    "dapo": ["grpo.clip_eps_high=0.28", "grpo.dynamic_sampling=drop_equal", "grpo.max_draws=2",
             "grpo.aggregation=dapo"],  # clip-higher, dynamic sampling, token-level aggregation
}
PANELS = {"rollout reward": "reward", "held-out reward (greedy)": "eval/reward", "entropy": "entropy",
          "KL to the reference": "kl", "clip fraction": "clip_fraction", "completion tokens": "completion_len"}


def run_variants(out: Path, steps: int, minutes: float | None = None, eval_every: int | None = None,
                 only: list[str] | None = None) -> dict[str, float]:
    """Each missing variant's run of ``steps`` optimizer steps (with ``minutes``: as many as fit in that much
    training-loop wall time, evals included, ``steps`` a cap), one after another; the wall seconds of those run now
    (also in each run's summary.json)."""
    took = {}
    for name, overrides in VARIANTS.items():
        run_dir = out / name
        if (run_dir / "summary.json").exists() or (only and name not in only):
            continue
        cmd = [sys.executable, "-m", "posttrain", "grpo", str(CONFIG), f"output_dir={run_dir}", *COMMON,
               f"train.max_steps={steps}", f"train.eval_every={eval_every or steps // 2}", *overrides,
               *([f"train.max_minutes={minutes}"] if minutes else [])]
        print("$", " ".join(cmd), flush=True)
        start = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT)
        took[name] = time.perf_counter() - start
        print(f"{name}: {took[name]:.0f} s", flush=True)
    return took


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def markdown_table(out: Path) -> str:
    """The RESULTS.md table of the runs under ``out``: wall time, rollout reward by halves, held-out answer and
    format rates at each eval, entropy, KL and clip fraction at the end, and dynamic sampling's cost."""
    from posttrain.engine.logging import read_metrics
    from posttrain.io import read_json

    lines = ["| variant | wall | steps | rollout reward, 1st / 2nd half | held-out answer correct, by eval | held-out "
             "format, by eval | entropy, first / last quarter | KL, last quarter | clip fraction | groups dropped "
             "(draws) |", "|---" * 10 + "|"]
    for name in VARIANTS:
        recs = read_metrics(out / name / "metrics.jsonl")
        steps = [r for r in recs if "reward" in r]
        evals = [r for r in recs if "eval/reward" in r]
        h, q = len(steps) // 2, max(1, len(steps) // 4)
        col = lambda rs, k: [r[k] for r in rs if k in r]  # noqa: E731
        summary = read_json(out / name / "summary.json") or {}
        wall = summary.get("seconds")
        dyn = (f"{_mean(col(steps, 'dynamic/dropped_share')):.2f} ({_mean(col(steps, 'dynamic/draws')):.2f})"
               if col(steps, "dynamic/draws") else "-")
        lines.append(
            f"| {name} | {wall / 60:.1f} min | {summary.get('steps')} | {_mean(col(steps[:h], 'reward')):.3f} / "
            f"{_mean(col(steps[h:], 'reward')):.3f} | "
            + " -> ".join(f"{r['eval/reward/gsm8k_answer']:.3f}" for r in evals) + " | "
            + " -> ".join(f"{r['eval/reward/regex']:.3f}" for r in evals) + " | "
            f"{_mean(col(steps[:q], 'entropy')):.3f} / {_mean(col(steps[-q:], 'entropy')):.3f} | "
            f"{_mean(col(steps[-q:], 'kl')):.4f} | {_mean(col(steps, 'clip_fraction')):.4f} | {dyn} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "grpo-variants")
    ap.add_argument("--steps", type=int, default=64, help="optimizer steps per variant (64: ~13 min each on 2 cores)")
    ap.add_argument("--minutes", type=float, default=None,
                    help="a training-loop time budget per variant (train.max_minutes); --steps is then a cap")
    ap.add_argument("--eval-every", type=int, default=None, help="steps between held-out evals (default steps/2)")
    ap.add_argument("--only", default=None, help="comma-separated variants to run (two processes can share a "
                                                 "machine: OMP_NUM_THREADS=1 each, --only a,b and --only c,d)")
    ap.add_argument("--report", action="store_true", help="only write the comparison of the runs already there")
    args = ap.parse_args()
    if not args.report:
        run_variants(args.out, args.steps, args.minutes, args.eval_every,
                     args.only.split(",") if args.only else None)
    from posttrain.report.compare import write_compare_report

    path = write_compare_report(args.out / "compare.html", {name: args.out / name for name in VARIANTS}, PANELS,
                                title="GRPO variants on GSM8K, one budget")
    print(f"wrote {path}")
    print(markdown_table(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
