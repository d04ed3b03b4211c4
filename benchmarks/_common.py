"""What bench_sft, bench_dpo and bench_grpo share: the common arguments, the alternating subprocess runs, the FLOP
ceiling readings, per-configuration precision (and skipping bf16 where the CPU would only emulate it), and the
ratio summary against TRL's best measured configuration.

Precision is part of a configuration's name so that one run can compare them side by side:
  <config>       the script's global precision (fp32 unless bench_sft's --dtype says otherwise)
  <config>-auto  posttrain only: ``model.dtype: auto``, whatever ``choose_numerics`` picks on this machine
  <config>-bf16  fp32 weights, gradients and optimizer state, forwards under torch.autocast(bfloat16): posttrain's
                 ``model.dtype: bf16_mixed``, TRL's ``bf16=True``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PRECISIONS = ("auto", "bf16")


# ----------------------------------------------------------------------------------------------------------------
# Per-configuration precision.

def expand(posttrain: tuple[str, ...], trl: tuple[str, ...]) -> tuple[str, ...]:
    """Every configuration with its precision variants: posttrain ones get -auto and -bf16, TRL ones -bf16 (TRL has
    no automatic choice)."""
    return (*posttrain, *(f"{c}-{p}" for c in posttrain for p in PRECISIONS), *trl, *(f"{c}-bf16" for c in trl))


def precision(config: str) -> str | None:
    """'auto', 'bf16', or None for the script's global precision."""
    return next((p for p in PRECISIONS if config.endswith("-" + p)), None)


def base_config(config: str) -> str:
    """The configuration without its precision suffix (what the worker builds)."""
    p = precision(config)
    return config.removesuffix("-" + p) if p else config


def posttrain_dtype(config: str, default: str = "float32") -> str:
    """The ``model.dtype`` a posttrain configuration trains with."""
    return {"auto": "auto", "bf16": "bf16_mixed"}.get(precision(config), default)


def bf16_skips(args: argparse.Namespace, configs: list[str]) -> dict[str, str]:
    """The -bf16 configurations not to run, with the reason, unless --force-bf16: on a CPU without native bf16 each
    bf16 matmul is emulated, and the slowdown (measured by choose_numerics' own 512^3 probe) goes into the reason.
    GPUs are not checked (bench_sft --device cuda)."""
    from posttrain.models.numerics import BF16_CPU_FLAGS, bf16_probe_speedup, cpu_flags

    bf16 = [c for c in configs if precision(c) == "bf16"]
    if not bf16 or args.force_bf16 or getattr(args, "device", "cpu") != "cpu" or set(BF16_CPU_FLAGS) & cpu_flags():
        return {}
    why = (f"skipped: CPU has no avx512_bf16/amx_bf16; bf16 matmuls are emulated, ~{1 / bf16_probe_speedup():.0f}x "
           "slower than fp32 here (512^3 probe); --force-bf16 runs it")
    return dict.fromkeys(bf16, why)


def trl_numerics(bf16: bool, weights: str = "float32") -> str:
    """How a TRL worker's numbers were computed (printed per run, as posttrain's choose_numerics description)."""
    return f"TRL bf16=True (weights in {weights}, autocast bfloat16)" if bf16 else f"TRL {weights}"


# ----------------------------------------------------------------------------------------------------------------
# Measurements.

def base_param_count(model) -> int:
    """Parameters of the base model, tied weights once, LoRA excluded."""
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if "lora_" in name or id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def matmul_gflops(n: int = 2048, iters: int = 10, repeats: int = 3, device: str = "cpu",
                  dtype: str = "float32") -> float:
    """Best n x n matmul rate (GFLOP/s) over a few timed loops: fp32 with this process's thread count on a CPU,
    or ``dtype`` on a GPU (n 8192 there, where 2048 is too small to fill the device)."""
    import torch

    on_gpu = device != "cpu"
    n = 8192 if on_gpu else n
    kw = {"device": device, "dtype": getattr(torch, dtype) if on_gpu else torch.float32}
    a, b, c = torch.randn(n, n, **kw), torch.randn(n, n, **kw), torch.empty(n, n, **kw)

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize()

    for _ in range(2):
        torch.mm(a, b, out=c)
    best = 0.0
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.mm(a, b, out=c)
        sync()
        best = max(best, 2 * n ** 3 * iters / (time.perf_counter() - t0) / 1e9)
    return best


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "peft", "trl", "accelerate", "datasets"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "-"
    return out


# ----------------------------------------------------------------------------------------------------------------
# Driver.

def start(p: argparse.ArgumentParser, known: tuple[str, ...], defaults: tuple[str, ...], run_worker,
          script: str) -> tuple[argparse.Namespace, list[str] | None]:
    """The arguments every benchmark shares; parse them, run this process's worker if it is one (configs None),
    else return the chosen configurations after checking their names."""
    p.add_argument("--configs", default=",".join(defaults), help=f"comma list of {', '.join(known)}")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds; the median per config is reported")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default=None, help="HF model folder; default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--force-bf16", action="store_true",
                   help="run -bf16 configurations even on a CPU without avx512_bf16/amx_bf16 (hours there)")
    p.add_argument("--json", default=None, help="write all raw results here")
    p.add_argument("--worker", choices=known, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.model is None:
        from posttrain.models import resolve_model_path

        args.model = resolve_model_path(None)
    if args.worker:
        run_worker(args)
        return args, None
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in configs if c not in known]
    if bad:
        p.error(f"unknown config(s) {bad}; known: {', '.join(known)}")
    return args, configs


def run_rounds(args: argparse.Namespace, configs: list[str], common: list[str], script: str, describe,
               skip: dict[str, str] | None = None) -> tuple[dict[str, list[dict]], list[float]]:
    """Each configuration's worker in its own subprocess (so peak RSS is its own), alternately for ``args.rounds``
    rounds, a printed line per run (``describe(result)``); the fp32 matmul rate is read before, between and after
    the runs. Configurations in ``skip`` are not run (their result list stays empty). Returns the results per
    configuration and the matmul readings."""
    import torch

    torch.set_num_threads(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    device, dtype = getattr(args, "device", "cpu"), getattr(args, "dtype", "float32")
    skip = skip or {}
    if all(c in skip for c in configs):
        sys.exit("nothing to run: " + "; ".join(f"{c} {why}" for c, why in skip.items()))
    if any(c.startswith("trl") and c not in skip for c in configs):
        try:
            import trl  # noqa: F401 - only whether it imports
        except ImportError:
            sys.exit(f"TRL is not installed in {sys.executable}; see the set-up lines at the top of {script}")

    def reading() -> float:
        return matmul_gflops(device=device, dtype=dtype)

    ceilings = [reading()]
    where = f"{args.threads} threads" if device == "cpu" else device
    print(f"{'fp32' if device == 'cpu' else dtype} matmul: {ceilings[0]:.1f} GFLOP/s ({where})", flush=True)
    results: dict[str, list[dict]] = {c: [] for c in configs}
    width = max(len(c) for c in configs)
    for c, why in skip.items():
        print(f"{c:{width}s} {why}", flush=True)
    with tempfile.TemporaryDirectory(prefix=f"{Path(script).stem}-") as tmp:
        for rnd in range(args.rounds):
            for c in (c for c in configs if c not in skip):
                res = Path(tmp) / f"{c}-{rnd}.json"
                ceilings.append(reading())  # between runs too: the best reading is the machine's ceiling
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, script, "--worker", c, "--result", str(res), *common],
                                      env=env, cwd=REPO, capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
                    sys.exit(f"{c} (round {rnd + 1}) failed with exit code {proc.returncode}")
                r = json.loads(res.read_text())
                results[c].append(r)
                print(f"round {rnd + 1}/{args.rounds} {c:{width}s} {describe(r)} ({time.perf_counter() - t0:.0f} s "
                      f"wall; matmul before it {ceilings[-1]:.0f} GFLOP/s) [{r.get('numerics', '?')}]", flush=True)
    ceilings.append(reading())
    print(f"matmul readings: {', '.join(f'{g:.0f}' for g in ceilings)} GFLOP/s; ceiling = best = "
          f"{max(ceilings):.1f}", flush=True)
    return results, ceilings


def medians(results: dict[str, list[dict]], keys: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Per measured configuration, the median of each key over its runs (skipped ones are left out)."""
    return {c: {k: statistics.median(r[k] for r in rs) for k in keys} for c, rs in results.items() if rs}


def best_trl(med: dict[str, dict[str, float]], key: str, higher_is_better: bool) -> str | None:
    trl = [c for c in med if c.startswith("trl")]
    if not trl:
        return None
    return (max if higher_is_better else min)(trl, key=lambda c: med[c][key])


def skipped_rows(skip: dict[str, str], columns: int) -> list[str]:
    """Table rows for configurations not run: the reason in the first value column, the rest empty."""
    return [f"| {c} | {why} |" + " |" * (columns - 2) for c, why in skip.items()]


def ratio_summary(results: dict[str, list[dict]], med: dict[str, dict[str, float]], key: str, unit: str,
                  higher_is_better: bool, skip: dict[str, str]) -> list[str]:
    """Each posttrain configuration against TRL's best measured one, and each -auto / -bf16 one against the same
    configuration in the default precision, with the numerics each ran in and the TRL configurations not measured."""
    best = best_trl(med, key, higher_is_better)
    better = "> 1 = posttrain faster" if higher_is_better else "< 1 = posttrain faster"
    lines = [f"Ratios of {unit} ({better}):"]
    if best is None:
        lines.append("  no TRL configuration measured, so no ratio to TRL")
    else:
        lines.append(f"  best TRL configuration measured: {best} ({med[best][key]:.2f} {unit}; "
                     f"{results[best][0].get('numerics', '?')})")
    missing = [c for c in skip if c.startswith("trl")]
    if missing:
        lines.append(f"  TRL's bf16 configuration ({', '.join(missing)}) was not measured on this CPU "
                     f"({skip[missing[0]]}), so 'best TRL' is the best of the TRL configurations without bf16; on a "
                     "CPU with native bf16 re-run to compare with TRL's bf16")
    for c in (c for c in med if c.startswith("posttrain")):
        numerics = results[c][0].get("numerics", "?")
        if best is not None:
            lines.append(f"  {c} / {best}: {med[c][key] / med[best][key]:.2f}x  [{numerics}]")
        plain = base_config(c)
        if plain != c and plain in med:  # what the precision alone changes
            lines.append(f"  {c} / {plain}: {med[c][key] / med[plain][key]:.2f}x  (model.dtype "
                         f"{posttrain_dtype(c)} vs the default precision)")
    return lines


def finish(args: argparse.Namespace, results: dict[str, list[dict]], ceilings: list[float], table_text: str) -> None:
    """The table, the package versions, and the raw results as JSON when asked."""
    print()
    print(table_text)
    v = versions()
    print("\nversions: " + ", ".join(f"{k} {x}" for k, x in v.items()) + f"; python {sys.version.split()[0]}")
    if args.json:
        # default=str: path arguments (bench_dpo's --data) are written as their text
        Path(args.json).write_text(json.dumps({"ceiling_gflops": ceilings, "versions": v, "args": vars(args),
                                               "results": results}, indent=1, default=str))
