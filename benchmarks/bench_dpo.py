"""LoRA DPO, KTO and ORPO throughput: posttrain vs TRL's DPOTrainer, KTOTrainer and ORPOTrainer, side by side, same
model, pairs, LoRA and batch settings.

Each framework runs in its own subprocess (so peak RSS is per framework), alternately, for ``--rounds`` rounds;
the table reports the median per configuration. Only optimizer steps after ``--warmup`` steps are timed (model
loading and tokenisation are excluded). The primary figure is preference pairs per second; both sides also count
the same tokens: prompt + chosen and prompt + rejected of every pair trained, so every prompt counts twice (TRL
feeds it twice; posttrain with a shared prompt feeds it once, and the 'positions' column shows what was fed).

Configurations:
  posttrain          posttrain's engine (pair_schedule + train_loop + PreferenceMethod "dpo"), packing=False: one pair
                     per row, laid out as prompt | chosen | rejected with the prompt shared (run through the model once)
  posttrain-pack     packing=True: pairs packed into rows of up to 2 * --max-len tokens, --pack-rows rows per
                     micro-batch (default 1: about the positions of TRL's micro-batch of --batch 2 padded pairs)
  posttrain-compile  posttrain with ``model.compile``: each decoder layer through torch.compile (compiled in the
                     warm-up steps)
  posttrain-noshare  posttrain-pack with share_prompt=False: chosen and rejected as two full segments (ablation)
  posttrain-precomp  posttrain with the reference log-probs computed in one pass before training
                     (``precompute_ref: true``, packed no-grad batches); its pairs/s is a one-epoch figure that
                     includes that pass: 1 / (training s/pair + reference-pass s/pair over the whole --pairs set)
  trl                TRL DPOTrainer (chosen rows then rejected rows, right-padded to the batch's longest sequence)
  posttrain-kto      KTO (``posttrain kto``'s blocks: kto_schedule + train_loop + KTOMethod, reference = adapters
                     off) on unpaired rows: every pair split into a desirable (chosen) and an undesirable (rejected)
                     row, as ``posttrain data unpair`` writes them; micro-batch ``--kto-rows`` rows (default 2 x
                     --batch), z0 from each micro-batch's mismatched completions (each row's prompt before the
                     previous row's completion), beta 0.1, class weights 1 and 1 (the rows are balanced)
  trl-kto            TRL KTOTrainer (``from trl import KTOTrainer``; ``trl.experimental.kto`` is a deprecated alias in
                     TRL 1.x), loss_type "kto" with its KL estimate on, the same settings, the same rows in the same
                     order and micro-batches (so the same mismatched pairs), max_length --max-len (as posttrain,
                     it cuts only mismatched sequences)
  posttrain-orpo     ORPO (``posttrain dpo`` with ``dpo.loss: orpo``: pair_schedule + train_loop + PreferenceMethod
                     "orpo", reference-free, so no reference forward), lambda 0.1, the ``posttrain`` batches
  trl-orpo           TRL ORPOTrainer (``trl.experimental.orpo``), beta (the paper's lambda) 0.1, the TRL DPO pairs
                     and batches; reference-free on both sides
KTO reports rows/s, its unit, and pairs/s = rows/s / 2; tokens count each row's own and mismatched sequence. TRL's
KTO and ORPO data go in as text rendered from posttrain's tokens, so that both sides train on the same tokens (why:
benchmarks/_pref_workers.py); the workers compare every sequence, KTO's mismatched ones included. The ORPO losses
differ in their NLL term (TRL averages it over the batch's chosen tokens, prompt included; posttrain over each
chosen response), which changes the loss value, not the work. Ratios compare within a family (DPO, KTO, ORPO).
Each also runs as ``<config>-bf16`` and posttrain's as ``<config>-auto`` (see benchmarks/_common.py; -bf16 is
skipped on a CPU without native bf16 unless --force-bf16); the default is posttrain, posttrain-auto, trl, trl-bf16.

Shared settings: the embedded SmolLM2-135M-Instruct in fp32 with SDPA attention, 2 torch threads, LoRA r=16
alpha=32 dropout 0 on q,k,v,o,gate,up,down, DPO sigmoid loss with beta 0.1, lr 5e-6 constant (no warmup), AdamW,
grad clip 1.0, micro-batch ``--batch`` pairs, no gradient accumulation, no gradient checkpointing. The reference
is the same model with its adapters disabled, run on the fly every step (posttrain: ``AdapterOffReference``; TRL:
``peft_config`` and no ``ref_model``, ``precompute_ref_log_probs=False``). TRL gets ``bf16=False`` (True for
-bf16), ``fp16=False, use_cpu=True`` and ``gradient_checkpointing=False`` (DPOConfig turns it on by default).

Data: the first ``--pairs`` pairs of ``--data`` (``../shared/data/hh-rlhf/harmless-base-test.jsonl.gz``) whose
chosen and rejected sequences (prompt + response) both fit in ``--max-len`` tokens, as posttrain's ``build_pairs``
renders them. TRL gets exactly those pairs as conversational prompt / chosen / rejected rows, in the order posttrain's
unpacked plan visits them (sequential sampling), so ``posttrain`` and ``trl`` train on identical micro-batches;
TRL's ``max_length`` is 2 * --max-len so it truncates nothing. The TRL worker checks that TRL's tokenisation
matches posttrain's token for token and reports how many sequences differ.

FLOP ceiling: a LoRA DPO step costs about 6 * N FLOPs per token (policy forward 2N, activation gradients 2N,
reference forward 2N; frozen weights need no weight gradients), N = the base model's parameter count including
the tied embedding/head, per counted token (prompt counted twice). Attention is left out. posttrain does less
than 6N per counted token: it runs a shared prompt once and the LM head only on response positions, so its
fraction is an effective one (work of two separate sequences per pair / time) and can pass 100%. ORPO costs 4N per
token (no reference); KTO 6N per token of a row's own sequence and 4N per token of its mismatched sequence (a
no-grad policy forward and a reference forward, on both sides). The fraction is that FLOP/s divided by the fp32
2048x2048 matmul rate measured by this script (before every run and at the end; the best reading counts).

Set-up and run (TRL lives only in the git-ignored .bench-venv; see benchmarks/README.md):
  .bench-venv/bin/python benchmarks/bench_dpo.py [--configs posttrain,posttrain-auto,trl,trl-bf16] [--json out.json]
  .bench-venv/bin/python benchmarks/bench_dpo.py --configs posttrain-kto,trl-kto,posttrain-orpo,trl-orpo
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers
from _common import (  # noqa: E402
    base_config,
    base_param_count,
    best_trl,
    bf16_skips,
    expand,
    finish,
    medians,
    peak_rss_mb,
    posttrain_dtype,
    precision,
    ratio_summary,
    run_rounds,
    skipped_rows,
    start,
    trl_numerics,
)
from _pref_common import (  # noqa: E402
    BETA,
    DATA,
    LORA,
    SEED,
    TRLClock,
    load_pairs,
    make_plan,
    posttrain_steps,
    trl_args,
    trl_model,
    trl_setup,
)
from _pref_workers import run_pref_worker  # noqa: E402

CONFIGS = expand(("posttrain", "posttrain-pack", "posttrain-compile", "posttrain-noshare", "posttrain-precomp",
                  "posttrain-kto", "posttrain-orpo"), ("trl", "trl-kto", "trl-orpo"))
DEFAULT_CONFIGS = ("posttrain", "posttrain-auto", "trl", "trl-bf16")


def family(config: str) -> str:
    """Which loss a configuration trains: 'kto', 'orpo' or 'dpo'; ratios compare within a family only."""
    base = base_config(config)
    return next((f for f in ("kto", "orpo") if base.endswith("-" + f)), "dpo")


# ----------------------------------------------------------------------------------------------------------------
# DPO workers (run in subprocesses); the KTO and ORPO ones are in _pref_workers.py.

def worker_posttrain(args: argparse.Namespace, name: str) -> dict[str, Any]:
    from posttrain.config import DPOSection
    from posttrain.data import pair_batches
    from posttrain.losses import PreferenceParams
    from posttrain.methods import PreferenceMethod, precompute_reference
    from posttrain.models import apply_lora, load_model
    from posttrain.models.reference import AdapterOffReference
    from posttrain.recipes._common import from_section, seed_everything

    seed_everything(SEED)
    loaded = load_model(args.model, dtype=posttrain_dtype(name), device="cpu")  # its default attention (sdpa_packed)
    name = base_config(name)  # the precision is in ``loaded.numerics`` from here on
    tok = loaded.tokenizer
    pairs, _, info = load_pairs(args.data, args.pairs, args.max_len, tok)
    n_params = base_param_count(loaded.model)
    seed_everything(SEED)
    model = apply_lora(loaded.model, r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"],
                       target_modules=LORA["targets"])
    if name == "posttrain-compile":
        from posttrain.models.compile import compile_layers

        compile_layers(model)
    share, packing = name != "posttrain-noshare", name in ("posttrain-pack", "posttrain-noshare")
    plan = make_plan(pairs, args.pack_rows if packing else args.batch, tok.pad_token_id, packing, args.max_len, share)
    reference, ref_seconds = AdapterOffReference(), 0.0
    if name == "posttrain-precomp":
        t0 = time.perf_counter()
        # As run_dpo: this pass runs before train_loop, so outside its autocast (fp32 for every model.dtype).
        with tempfile.TemporaryDirectory(prefix="bench-ref-") as tmp:
            batches = pair_batches(pairs, args.batch, tok.pad_token_id, share, args.max_len)
            reference = precompute_reference(reference, model, batches, len(pairs), Path(tmp) / "ref.pt")
        ref_seconds = time.perf_counter() - t0
    method = PreferenceMethod("dpo", from_section(PreferenceParams, DPOSection(beta=BETA)), reference)

    def count(micro: list) -> dict[str, float]:  # pairs, tokens (prompt twice), positions, FLOP weight
        tokens = sum(len(pairs[i]) for b in micro for i in b["pair_index"].tolist())
        return {"pairs": sum(len(b["pair_index"]) for b in micro), "tokens": tokens,
                "positions": sum(b["input_ids"].numel() for b in micro), "work": 6 * tokens}

    steps = posttrain_steps(model, method, plan, count, args, loaded.numerics.autocast)  # autocast: as a recipe run
    return {"steps": steps, "n_params": n_params, **info, "rows": len(plan.units), "ref_seconds": ref_seconds,
            "numerics": f"posttrain {loaded.numerics.describe()}"}


def trl_batch_counts(inputs: dict[str, Any]) -> dict[str, float]:
    """Pairs, non-padding tokens, padded positions and FLOP weight of one TRL 1.x DPO batch.

    TRL 1.x collates every pair's prompt + chosen as a row, then every pair's prompt + rejected, with
    ``attention_mask`` marking real tokens and ``completion_mask`` the responses; other layouts are refused
    rather than miscounted.
    """
    if "attention_mask" not in inputs or "completion_mask" not in inputs:
        raise RuntimeError(f"unexpected TRL DPO batch layout {sorted(inputs)}; update trl_batch_counts")
    mask = inputs["attention_mask"]
    tokens = int(mask.sum())
    return {"pairs": mask.shape[0] // 2, "tokens": tokens, "positions": mask.numel(), "work": 6 * tokens}


def worker_trl(args: argparse.Namespace, bf16: bool) -> dict[str, Any]:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from posttrain.models import load_tokenizer

    trl_setup()
    # posttrain's tokenizer loader (AutoTokenizer + EOS as pad if none), so both sides select the same pairs.
    tok = load_tokenizer(args.model)
    pairs, convs, info = load_pairs(args.data, args.pairs, args.max_len, tok)
    # The pair order of posttrain's unpacked plan, step by step; TRL reads it sequentially, so both train on
    # identical micro-batches and a step's cost does not depend on which pairs the two samplers happened to draw.
    plan = make_plan(pairs, args.batch, tok.pad_token_id, False, args.max_len)
    order = [int(i) for s in range(args.warmup + args.steps) for b in plan.step(s) for i in b["pair_index"]]
    ds = Dataset.from_list([convs[i] for i in order])
    model, n_params, peft_config = trl_model(args)
    out = tempfile.mkdtemp(prefix="bench-trl-")
    cfg = DPOConfig(**trl_args(args, out, args.batch, bf16), max_length=2 * args.max_len, padding_free=False,
                    beta=BETA, loss_type=["sigmoid"], precompute_ref_log_probs=False)
    clock = TRLClock(trl_batch_counts)
    trainer = clock.trainer(DPOTrainer)(model=model, args=cfg, train_dataset=ds, processing_class=tok,
                                        peft_config=peft_config, callbacks=[clock.callback()])
    # Same pairs, same tokens? Compare TRL's tokenisation of each fed row with posttrain's rendering.
    prepared = trainer.train_dataset
    if len(prepared) != len(order):
        raise RuntimeError(f"TRL kept {len(prepared)} of {len(order)} rows; nothing should be filtered")
    differ, token_diff = 0, 0
    for i, ex in zip(order, prepared):
        p = pairs[i]
        trl_c, trl_r = ex["prompt_ids"] + ex["chosen_ids"], ex["prompt_ids"] + ex["rejected_ids"]
        differ += (trl_c != p.chosen.input_ids) + (trl_r != p.rejected.input_ids)
        token_diff += len(trl_c) + len(trl_r) - len(p)
    trainer.train()
    shutil.rmtree(out, ignore_errors=True)  # save_strategy="no": nothing in it worth keeping
    return {"steps": clock.steps(), "n_params": n_params, **info, "rows": len(pairs), "fed_rows": len(prepared),
            "sequences_differing_from_posttrain": differ, "sequences_compared": 2 * len(order),
            "token_diff_vs_posttrain": token_diff, "padding_free": bool(getattr(trainer, "padding_free", False)),
            "gradient_checkpointing": bool(cfg.gradient_checkpointing),
            "optim": str(getattr(cfg.optim, "value", cfg.optim)), "numerics": trl_numerics(bf16)}


def run_worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    name = args.worker
    bf16 = precision(name) == "bf16"
    result = run_pref_worker(args, name, bf16)
    if result is None:
        result = worker_trl(args, bf16) if name.startswith("trl") else worker_posttrain(args, name)
    measured = [s for s in result["steps"] if s["step"] > args.warmup]
    if not measured:
        raise RuntimeError("no timed step: --steps must be at least 1")
    seconds = sum(s["seconds"] for s in measured)
    n = len(measured)
    total = {k: sum(s[k] for s in measured) for k in ("pairs", "tokens", "positions", "work")}
    if result.get("ref_seconds"):  # one epoch: every pair trained once, and the reference pass over all of them
        seconds *= 1 + result["ref_seconds"] / result["pairs"] / (seconds / total["pairs"])
    result.update(config=name, threads=torch.get_num_threads(), peak_rss_mb=peak_rss_mb(), measured_steps=n,
                  seconds=seconds, pairs_per_s=total["pairs"] / seconds, tokens_per_s=total["tokens"] / seconds,
                  work_per_s=total["work"] / seconds, s_per_step=seconds / n, pairs_per_step=total["pairs"] / n,
                  tokens_per_step=total["tokens"] / n, positions_per_step=total["positions"] / n)
    if "rows" in measured[0]:  # KTO: unpaired rows are its unit; pairs = rows / 2
        result["rows_per_s"] = sum(s["rows"] for s in measured) / seconds
    Path(args.result).write_text(json.dumps(result, indent=1))


# ----------------------------------------------------------------------------------------------------------------
# Driver.

def table(results: dict[str, list[dict]], ceiling: float, warmup: int, steps: int, skip: dict[str, str]) -> str:
    """Markdown table of the per-config medians, with the pairs/s ratio against the best measured TRL
    configuration of the same family (DPO, KTO, ORPO) and the FLOP-ceiling share."""
    keys = ("pairs_per_s", "tokens_per_s", "work_per_s", "peak_rss_mb", "s_per_step", "pairs_per_step",
            "tokens_per_step", "positions_per_step")
    med = medians(results, keys)
    rows_med = medians({c: rs for c, rs in results.items() if rs and "rows_per_s" in rs[0]}, ("rows_per_s",))
    fams = sorted({family(c) for c in results}, key=("dpo", "kto", "orpo").index)
    best = {f: best_trl({c: m for c, m in med.items() if family(c) == f}, "pairs_per_s", True) for f in fams}
    n_params = next(rs for rs in results.values() if rs)[0]["n_params"]
    lines = ["| config | pairs/s | rows/s | tokens/s | s/step | peak RSS MB | pairs/step | tokens/step | "
             "positions/step | runs (pairs/s) | vs best TRL (pairs/s) | FLOP ceiling fraction |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c, m in med.items():
        b = best[family(c)]
        ratio = f"{m['pairs_per_s'] / med[b]['pairs_per_s']:.2f}x vs {b}" if b else "-"
        frac = m["work_per_s"] * n_params / (ceiling * 1e9)
        runs = ", ".join(f"{r['pairs_per_s']:.2f}" for r in results[c])
        rows = f"{rows_med[c]['rows_per_s']:.2f}" if c in rows_med else "-"
        lines.append(f"| {c} | {m['pairs_per_s']:.2f} | {rows} | {m['tokens_per_s']:.1f} | {m['s_per_step']:.2f} | "
                     f"{m['peak_rss_mb']:.0f} | {m['pairs_per_step']:.1f} | {m['tokens_per_step']:.0f} | "
                     f"{m['positions_per_step']:.0f} | {runs} | {ratio} | {100 * frac:.0f}% |")
    lines += skipped_rows(skip, 12)
    notes = [f"Medians over runs (the 'runs' column lists each run's pairs/s); {steps} timed optimizer steps after "
             f"{warmup} warm-up steps per run. DPO and ORPO: tokens = prompt + chosen and prompt + rejected of "
             f"every pair trained (the work of two separate sequences, what TRL feeds); positions = input tensor "
             f"size as fed, padding included (a shared prompt is fed once). KTO: rows/s is its own unit and pairs/s "
             f"= rows/s / 2; tokens = each row's own sequence and its mismatched (z0) sequence, both sides counted "
             f"from their own batches.",
             f"FLOP ceiling: fp32 2048x2048 matmul at {ceiling:.1f} GFLOP/s, N = {n_params / 1e6:.1f} M; FLOPs per "
             f"token: DPO 6N (policy forward + backward, reference forward), ORPO 4N (no reference), KTO 6N per "
             f"own-sequence token and 4N per mismatched one (two no-grad forwards). A framework that computes a "
             f"shared prompt once can pass 100%."]
    for c in (c for c in med if c.startswith("trl")):
        r = results[c][0]
        kl = f", KL (z0) estimate {r['kl_estimate']}" if "kl_estimate" in r else ""
        notes.append(f"{c} tokenisation vs posttrain's: {r['sequences_differing_from_posttrain']} of "
                     f"{r['sequences_compared']} fed sequences differ, {r['token_diff_vs_posttrain']:+d} tokens "
                     f"in all; TRL optim {r['optim']}, padding_free {r['padding_free']}, gradient checkpointing "
                     f"{r['gradient_checkpointing']}{kl}.")
    for f in fams:
        sub = {c: rs for c, rs in results.items() if family(c) == f}
        if len(fams) > 1:
            notes.append(f"{f.upper()}:")
        notes += ratio_summary(sub, {c: m for c, m in med.items() if c in sub}, "pairs_per_s", "pairs/s", True,
                               {c: why for c, why in skip.items() if family(c) == f})
    return "\n".join(lines) + "\n\n" + "\n".join(notes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=64, help="preference pairs in the fixed training subset")
    p.add_argument("--max-len", type=int, default=256, help="token cap for prompt + response (chosen and rejected)")
    p.add_argument("--batch", type=int, default=2, help="micro-batch in pairs (DPO, ORPO; not -pack, -noshare)")
    p.add_argument("--pack-rows", type=int, default=1, help="micro-batch in packed rows (posttrain-pack, -noshare)")
    p.add_argument("--kto-rows", type=int, default=None,
                   help="KTO micro-batch in unpaired rows (default 2 x --batch: the rows of --batch pairs)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--data", type=Path, default=DATA, help="HH-style pair file (default: %(default)s)")
    args, configs = start(p, CONFIGS, DEFAULT_CONFIGS, run_worker, __file__)
    if configs is None:
        return
    if not args.data.exists():
        sys.exit(f"missing {args.data}; see benchmarks/prepare_hh.py")
    kto_rows = args.kto_rows or 2 * args.batch
    if kto_rows < 2:
        sys.exit("--kto-rows must be at least 2: KTO's z0 pairs each row with another row's completion")

    common = ["--model", args.model, "--pairs", str(args.pairs), "--max-len", str(args.max_len), "--batch",
              str(args.batch), "--pack-rows", str(args.pack_rows), "--kto-rows", str(kto_rows), "--warmup",
              str(args.warmup), "--steps", str(args.steps), "--lr", str(args.lr), "--threads", str(args.threads),
              "--data", str(args.data.resolve())]

    def describe(r: dict[str, Any]) -> str:
        # DPO: policy == reference at step 1 (LoRA B = 0), log 2 = 0.6931 on both; KTO: 0.5 per row, times its weight
        loss1 = r["steps"][0]["loss"]
        rows = f" {r['rows_per_s']:6.2f} rows/s" if "rows_per_s" in r else ""
        return (f"{r['pairs_per_s']:6.2f} pairs/s{rows} {r['tokens_per_s']:7.1f} tokens/s {r['s_per_step']:6.2f} "
                f"s/step {r['tokens_per_step']:6.0f} tokens/step {r['peak_rss_mb']:6.0f} MB "
                f"loss@1 {'-' if loss1 is None else f'{loss1:.4f}'} "
                f"(data: {r['pairs']} pairs, {r['dataset_tokens']} tokens, {r['rows']} rows)")

    skip = bf16_skips(args, configs)
    results, ceilings = run_rounds(args, configs, common, __file__, describe, skip)
    first = next(rs for rs in results.values() if rs)[0]
    print(f"data: {first['data']} ({first['overlong_in_prefix']} over-long and {first['bad_in_prefix']} bad pairs "
          f"skipped before the last kept one)")
    finish(args, results, ceilings, table(results, max(ceilings), args.warmup, args.steps, skip))


if __name__ == "__main__":
    main()
