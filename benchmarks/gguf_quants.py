"""GGUF export round trip per quantization: how far each file, read back through transformers' GGUF loader, is
from base + adapter on the 8 fixed check prompts. These numbers set the tolerances in models/gguf_write.QUANTS.

    posttrain sft examples/sft-lora.yaml train.max_steps=20 output_dir=runs/gguf-bench/sft eval_samples=0
    .venv/bin/python benchmarks/gguf_quants.py runs/gguf-bench/sft [--quants f16,q8_0,...] [--max-new-tokens 32]

Each quantization goes through `posttrain export RUN --format gguf --quant Q` (export_gguf), so the table is what
the command checks. Prints a markdown table (and writes OUT/gguf_quants.json) for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    from posttrain.ship import export_gguf

    ap = argparse.ArgumentParser()
    ap.add_argument("run", help="a LoRA run folder (or adapter folder)")
    ap.add_argument("--quants", default="f16,bf16,q8_0,q5_1,q5_0,q4_1,q4_0")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--out", default=None, help="where the .gguf folders go (default: RUN/../gguf)")
    args = ap.parse_args()
    out = Path(args.out or Path(args.run).resolve().parent / "gguf")
    rows = []
    for q in args.quants.split(","):
        t0 = time.perf_counter()
        r = export_gguf(args.run, str(out / q), quant=q, max_new_tokens=args.max_new_tokens)
        c = r["gguf_vs_base_plus_adapter"]
        rows.append({"quant": q, "max_abs_logit_diff": c["max_abs_logit_diff"],
                     "mean_abs_logit_diff": c["mean_abs_logit_diff"], "logit_scale": c["reference_logit_scale"],
                     "greedy_identical": c["greedy_identical"], "prompts": c["prompts"],
                     "top1_agreement": c["top1_agreement"], "top1_positions": c["top1_positions"],
                     "top1_flipped_max_margin": c["top1_flipped_max_margin"],
                     "diverged": c["diverged_prompts"], "tokenizer_ids": r["tokenizer"]["ids_identical"],
                     "bytes": r["bytes"], "bits_per_weight": r["bits_per_weight"],
                     "within_tolerance": r["within_tolerance"], "seconds": time.perf_counter() - t0})
        print(json.dumps(rows[-1]), flush=True)
        (out / q / r["file"]).unlink()  # keep the report; the files are re-made by the command above
    (out / "gguf_quants.json").write_text(json.dumps(rows, indent=2))
    print("\n| quant | max abs dlogit | mean abs dlogit | top-1 agreement (teacher-forced) | largest flipped margin "
          "| greedy identical | tokenizer ids | file MB | bits/weight | within tolerance | s |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")
    for x in rows:
        print(f"| {x['quant']} | {x['max_abs_logit_diff']:.3g} | {x['mean_abs_logit_diff']:.3g} | "
              f"{x['top1_agreement']:.4f} of {x['top1_positions']} | {x['top1_flipped_max_margin']:.3g} | "
              f"{x['greedy_identical']}/{x['prompts']} | {x['tokenizer_ids']}/{x['prompts']} | "
              f"{x['bytes'] / 1e6:.1f} | {x['bits_per_weight']:.2f} | {x['within_tolerance']} | {x['seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
