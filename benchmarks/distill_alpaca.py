"""On-policy distillation (GKD) on AlpacaEval, end to end: an SFT teacher distilled into the base model.

    .venv/bin/python benchmarks/distill_alpaca.py [--out runs/bench-distill] [--sft-steps 12] [--steps 12]

1. Data: ``benchmarks/prepare_alpaca_eval.py`` (700 train / 105 held-out GPT-4 answers), written when missing.
2. Teacher: ``posttrain sft examples/sft-alpaca-eval.yaml`` on the embedded SmolLM2 with a reduced budget
   (``--sft-steps`` optimizer steps of 4 packed rows of 512 tokens, no held-out eval), reused when its run folder
   is complete.
3. Student: the base embedded model with a fresh LoRA (r 16, all linear layers), ``posttrain distill
   examples/distill-alpaca.yaml``: one run of ``--steps`` steps for quality, then ``--memory-steps`` steps with each
   teacher mode, every run in a subprocess of its own:
   - shared base: the teacher is its SFT adapter switched on over the student's own base (no second copy);
   - separate model: the teacher adapter merged into a saved model folder (``posttrain merge``) and loaded as a
     model of its own (``distill.teacher.name``).
   Each child reports its peak resident memory (``getrusage(RUSAGE_SELF).ru_maxrss``) and its summary.
Prints held-out KL(teacher || student) and the student's NLL of the teacher's greedy answers, before and after,
with both teacher modes' peak RSS, and writes them to OUT/results.json. Needs ../shared/data (a benchmark, not the
project).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = [ROOT / "runs/data/alpaca-eval-train.jsonl", ROOT / "runs/data/alpaca-eval-heldout.jsonl"]


def sh(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run(args, check=True, cwd=ROOT)


def child(overrides: list[str]) -> int:
    """One distill run in this process; prints its summary and peak RSS as one JSON line at the end."""
    from posttrain.config import load_config
    from posttrain.recipes import RECIPES

    summary = RECIPES["distill"].run(load_config(ROOT / "examples/distill-alpaca.yaml", overrides))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes
    print("RESULT " + json.dumps({"summary": summary, "peak_rss_mb": round(peak_mb, 1)}), flush=True)
    return 0


def run_child(overrides: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *overrides], cwd=ROOT, check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    sys.stdout.write("".join(line + "\n" for line in out.splitlines() if not line.startswith("RESULT ")))
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[len("RESULT "):])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("runs/bench-distill"))
    ap.add_argument("--sft-steps", type=int, default=10, help="teacher SFT optimizer steps (4 packed rows of 512 "
                    "tokens each)")
    ap.add_argument("--steps", type=int, default=12, help="distillation steps of the quality run")
    ap.add_argument("--memory-steps", type=int, default=3, help="steps of each teacher mode's memory run")
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--eval-prompts", type=int, default=16)
    ap.add_argument("--alpaca-src", type=Path, default=None, help="prepare_alpaca_eval.py's --src (default: its own)")
    ap.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        return child(args.child)
    out = (ROOT / args.out).resolve()
    py = sys.executable
    if not all(p.is_file() for p in DATA):
        sh(py, "benchmarks/prepare_alpaca_eval.py", *(["--src", str(args.alpaca_src)] if args.alpaca_src else []))
    teacher = out / "teacher"
    if not (teacher / "summary.json").is_file():
        sh(py, "-m", "posttrain", "sft", "examples/sft-alpaca-eval.yaml", f"output_dir={teacher}",
           f"train.max_steps={args.sft_steps}", "train.grad_accum=2", "data.max_seq_len=512", "data.eval=null",
           "data.eval_fraction=0", "train.eval_every=null", "train.save_every=null", "eval_samples=0")
    merged = out / "teacher-merged"
    if not (merged / "config.json").is_file():
        sh(py, "-m", "posttrain", "merge", str(teacher), "--out", str(merged))
    common = [f"distill.prompts_per_step={args.prompts_per_step}", f"distill.max_new_tokens={args.max_new_tokens}",
              f"distill.eval_max_new_tokens={args.max_new_tokens}", f"data.eval_limit={args.eval_prompts}",
              "train.eval_every=null", "train.save_every=null"]
    teachers = {"shared base": [f"distill.teacher.adapter={teacher}"],
                # the merged teacher alone: the example's adapter is switched off
                "separate model": [f"distill.teacher.name={merged}", "distill.teacher.adapter=null"]}
    # The quality run (shared base, --steps), then both teacher modes side by side for memory (--memory-steps:
    # the peak is set by the weights and one step's activations, not by how many steps run). A finished run's
    # result is kept in its folder and reused.
    plan = [("shared base", args.steps), ("shared base", args.memory_steps), ("separate model", args.memory_steps)]
    rows = []
    for mode, steps in dict.fromkeys(plan):
        run_dir = out / f"distill-{mode.replace(' ', '-')}-{steps}"
        done = run_dir / "result.json"
        if not done.is_file():
            r = run_child([f"output_dir={run_dir}", f"train.max_steps={steps}", *teachers[mode], *common])
            done.write_text(json.dumps(r))
        r = json.loads(done.read_text())
        s = r["summary"]
        a, b = s["eval_before"], s["eval_after"]
        rows.append({"teacher": mode, "steps": steps, "kl_before": a["eval/kl"], "kl_after": b["eval/kl"],
                     "nll_before": a["eval/teacher_nll"], "nll_after": b["eval/teacher_nll"],
                     "peak_rss_mb": r["peak_rss_mb"], "seconds": s["seconds"],
                     "teacher_weight_mb": round(s["teacher"]["weight_bytes"] / 2 ** 20, 1)})
    machine = f"{platform.machine()}, {_cpu_model()}"
    report = {"machine": machine, "args": vars(args), "rows": rows}
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"\nmachine: {machine}; teacher SFT {args.sft_steps} steps; distill steps of {args.prompts_per_step} "
          f"prompts, {args.max_new_tokens} new tokens; {args.eval_prompts} held-out prompts")
    print("| teacher | steps | held-out KL before | after | teacher-answer NLL before | after | teacher weights MB | "
          "peak RSS MB | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rss = "-" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f}"
        print(f"| {r['teacher']} | {r['steps']} | {r['kl_before']:.4f} | {r['kl_after']:.4f} | {r['nll_before']:.4f} | "
              f"{r['nll_after']:.4f} | {r['teacher_weight_mb']} | {rss} | {r['seconds']:.0f} |")
    return 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    raise SystemExit(main())
