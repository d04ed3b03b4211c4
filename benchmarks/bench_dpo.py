"""LoRA DPO throughput: posttrain vs TRL's DPOTrainer, side by side, same model, pairs, LoRA and batch settings.

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
Each also runs as ``<config>-bf16`` and posttrain's as ``<config>-auto`` (see benchmarks/_common.py; -bf16 is
skipped on a CPU without native bf16 unless --force-bf16); the default is posttrain, posttrain-auto, trl, trl-bf16.

Shared settings: the embedded SmolLM2-135M-Instruct in fp32 with SDPA attention, 2 torch threads, LoRA r=16
alpha=32 dropout 0 on q,k,v,o,gate,up,down, DPO sigmoid loss with beta 0.1, lr 5e-6 constant (no warmup), AdamW,
grad clip 1.0, micro-batch ``--batch`` pairs, no gradient accumulation, no gradient checkpointing. The reference
is the same model with its adapters disabled, run on the fly every step (posttrain: ``AdapterOffReference``; TRL:
``peft_config`` and no ``ref_model``, ``precompute_ref_log_probs=False``). TRL gets ``bf16=False`` (True for
-bf16), ``fp16=False, use_cpu=True`` and ``gradient_checkpointing=False`` (DPOConfig turns it on by default).

Data: the first ``--pairs`` pairs of ``../shared/data/hh-rlhf/harmless-base-test.jsonl.gz`` whose chosen and
rejected sequences (prompt + response) both fit in ``--max-len`` tokens, as posttrain's ``build_pairs`` renders
them. TRL gets exactly those pairs as conversational prompt / chosen / rejected rows, in the order posttrain's
unpacked plan visits them (sequential sampling), so ``posttrain`` and ``trl`` train on identical micro-batches;
TRL's ``max_length`` is 2 * --max-len so it truncates nothing. The TRL worker checks that TRL's tokenisation
matches posttrain's token for token and reports how many sequences differ.

FLOP ceiling: a LoRA DPO step costs about 6 * N FLOPs per token (policy forward 2N, activation gradients 2N,
reference forward 2N; frozen weights need no weight gradients), N = the base model's parameter count including
the tied embedding/head, per counted token (prompt counted twice). Attention is left out. posttrain does less
than 6N per counted token: it runs a shared prompt once and the LM head only on response positions, so its
fraction is an effective one (work of two separate sequences per pair / time) and can pass 100%. The fraction is
that FLOP/s divided by the fp32 2048x2048 matmul rate measured by this script (before every run and at the end;
the best reading counts).

Set-up and run (TRL lives only in the git-ignored .bench-venv; see benchmarks/README.md):
  .bench-venv/bin/python benchmarks/bench_dpo.py [--configs posttrain,posttrain-auto,trl,trl-bf16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:  # posttrain imports torch: only workers pay for it
    from posttrain.data import Pair, StepSchedule

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parents[2] / "shared/data/hh-rlhf/harmless-base-test.jsonl.gz"
CONFIGS = expand(("posttrain", "posttrain-pack", "posttrain-compile", "posttrain-noshare", "posttrain-precomp"),
                 ("trl",))
DEFAULT_CONFIGS = ("posttrain", "posttrain-auto", "trl", "trl-bf16")
LORA = dict(r=16, alpha=32, dropout=0.0, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"])
BETA = 0.1
SEED = 0


# ----------------------------------------------------------------------------------------------------------------
# Shared by both workers: the same pairs, selected the same way, visited in the same order.

def load_pairs(n: int, max_len: int, tokenizer) -> tuple[list[Pair], list[dict[str, Any]], dict[str, Any]]:
    """(posttrain Pairs, the same pairs as TRL conversational rows, data info) for the first ``n`` HH pairs whose
    chosen and rejected renderings both fit in ``max_len`` tokens.

    posttrain's own ``build_pairs`` decides the fit (on a temporary JSONL of a growing prefix of the file), so the
    rule is exactly the one a posttrain run applies with ``overlong: drop, bad_pairs: drop``.
    """
    from posttrain.data import build_pairs, read_rows, row_to_pair

    rows = [r for _, r in read_rows(DATA)]
    take = min(len(rows), 4 * n)
    with tempfile.TemporaryDirectory(prefix="bench-dpo-data-") as tmp:
        path = Path(tmp) / "pairs.jsonl"
        while True:  # most HH dialogues are long: widen the prefix until n pairs fit or the file runs out
            path.write_text("".join(json.dumps(r) + "\n" for r in rows[:take]))
            pairs, report = build_pairs(str(path), tokenizer, max_seq_len=max_len, overlong="drop", bad_pairs="drop")
            if len(pairs) >= n or take == len(rows):
                break
            take = min(len(rows), 2 * take)
    pairs = pairs[:n]  # build_pairs numbers them 0.. in file order, so pair.index stays its position here
    convs = []
    for p in pairs:
        # Pair.row is the line number in the temporary file (no blank lines), i.e. the source row number.
        prompt, chosen, rejected = row_to_pair(rows[p.row - 1], str(DATA), p.row)
        if prompt != p.prompt:
            raise RuntimeError(f"row {p.row}: the prompt re-parsed for TRL differs from posttrain's")
        convs.append({"prompt": p.prompt, "chosen": chosen, "rejected": rejected})
    info = {"data": f"{DATA.name}: first {len(pairs)} pairs fitting {max_len} tokens, from rows 1-{pairs[-1].row}",
            "pairs": len(pairs), "last_row": pairs[-1].row,
            "bad_in_prefix": sum(1 for num, _ in report.bad if num <= pairs[-1].row),
            "overlong_in_prefix": sum(1 for num in report.dropped_overlong if num <= pairs[-1].row),
            "dataset_tokens": sum(len(p) for p in pairs)}
    return pairs, convs, info


def make_plan(pairs: list[Pair], batch: int, pad_id: int, packing: bool, max_len: int,
              share_prompt: bool = True) -> StepSchedule:
    from posttrain.data import pair_schedule

    return pair_schedule(pairs, micro_batch_size=batch, grad_accum=1, seed=SEED, pad_id=pad_id, packing=packing,
                         max_seq_len=max_len, share_prompt=share_prompt)


# ----------------------------------------------------------------------------------------------------------------
# Workers (run in subprocesses).

def worker_posttrain(args: argparse.Namespace, name: str) -> dict[str, Any]:
    from posttrain.config import DPOSection, TrainConfig
    from posttrain.data import pair_batches
    from posttrain.engine import LoopOptions, read_metrics, train_loop
    from posttrain.losses import PreferenceParams
    from posttrain.methods import PreferenceMethod, precompute_reference
    from posttrain.models import apply_lora, load_model
    from posttrain.models.reference import AdapterOffReference
    from posttrain.recipes._common import from_section, seed_everything

    seed_everything(SEED)
    loaded = load_model(args.model, dtype=posttrain_dtype(name), device="cpu")  # its default attention (sdpa_packed)
    name = base_config(name)  # the precision is in ``loaded.numerics`` from here on
    tok = loaded.tokenizer
    pairs, _, info = load_pairs(args.pairs, args.max_len, tok)
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

    counts: dict[int, tuple[int, int, int, int]] = {}

    class Counted:  # what each optimizer step trains and feeds: pairs, tokens (prompt twice), fed tokens, positions
        def step(self, step: int):
            micro = plan.step(step)
            counts[step + 1] = (sum(len(b["pair_index"]) for b in micro),
                                sum(len(pairs[i]) for b in micro for i in b["pair_index"].tolist()),
                                sum(int(b["num_tokens"]) for b in micro), sum(b["input_ids"].numel() for b in micro))
            return micro

    # min_lr_ratio=1 turns posttrain's warmup-cosine schedule into a constant lr, as TRL's "constant".
    opts = from_section(LoopOptions, TrainConfig(lr=args.lr, min_lr_ratio=1.0, max_grad_norm=1.0, log_every=1),
                        total_steps=args.warmup + args.steps, warmup_steps=0, optimizer="adamw",
                        autocast=loaded.numerics.autocast)  # as a recipe run
    with tempfile.TemporaryDirectory(prefix="bench-posttrain-") as out:
        train_loop(model, method, Counted(), opts, Path(out))
        records = [r for r in read_metrics(Path(out) / "metrics.jsonl") if "tokens_per_s" in r]
    steps = []
    for r in records:  # tokens_per_s = fed tokens / (time from the end of the previous step's log to this one)
        n_pairs, tokens, fed, positions = counts[r["step"]]
        steps.append({"step": r["step"], "pairs": n_pairs, "tokens": tokens, "positions": positions,
                      "seconds": fed / r["tokens_per_s"], "loss": r["loss"]})
    return {"steps": steps, "n_params": n_params, **info, "rows": len(plan.units), "ref_seconds": ref_seconds,
            "numerics": f"posttrain {loaded.numerics.describe()}"}


def trl_batch_counts(inputs: dict[str, Any]) -> tuple[int, int, int]:
    """(pairs, non-padding tokens, padded positions) of one TRL 1.x DPO batch.

    TRL 1.x collates every pair's prompt + chosen as a row, then every pair's prompt + rejected, with
    ``attention_mask`` marking real tokens and ``completion_mask`` the responses; other layouts are refused
    rather than miscounted.
    """
    if "attention_mask" not in inputs or "completion_mask" not in inputs:
        raise RuntimeError(f"unexpected TRL DPO batch layout {sorted(inputs)}; update trl_batch_counts")
    mask = inputs["attention_mask"]
    return mask.shape[0] // 2, int(mask.sum()), mask.numel()


def worker_trl(args: argparse.Namespace, bf16: bool) -> dict[str, Any]:
    import torch
    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from posttrain.models import load_tokenizer

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.set_seed(SEED)
    # posttrain's tokenizer loader (AutoTokenizer + EOS as pad if none), so both sides select the same pairs.
    tok = load_tokenizer(args.model)
    pairs, convs, info = load_pairs(args.pairs, args.max_len, tok)
    total = args.warmup + args.steps
    # The pair order of posttrain's unpacked plan, step by step; TRL reads it sequentially, so both train on
    # identical micro-batches and a step's cost does not depend on which pairs the two samplers happened to draw.
    plan = make_plan(pairs, args.batch, tok.pad_token_id, False, args.max_len)
    order = [int(i) for s in range(total) for b in plan.step(s) for i in b["pair_index"]]
    ds = Dataset.from_list([convs[i] for i in order])
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    n_params = base_param_count(model)
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules=LORA["targets"], bias="none", task_type="CAUSAL_LM")
    out = tempfile.mkdtemp(prefix="bench-trl-")
    cfg = DPOConfig(
        output_dir=out, max_steps=total, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0,
        seed=SEED, data_seed=SEED, train_sampling_strategy="sequential",
        bf16=bf16, fp16=False, use_cpu=True, gradient_checkpointing=False,
        max_length=2 * args.max_len, padding_free=False, beta=BETA, loss_type=["sigmoid"],
        precompute_ref_log_probs=False,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0,
    )

    step_counts: list[tuple[int, int, int]] = []
    pending = [0, 0, 0]

    class Counting(DPOTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            for k, v in enumerate(trl_batch_counts(inputs)):
                pending[k] += v
            return super().training_step(model, inputs, num_items_in_batch)

    ends: list[float] = []
    losses: dict[int, float] = {}

    class Timer(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            ends.clear()
            ends.append(time.perf_counter())  # step 1's start (warm-up, not measured)

        def on_step_end(self, a, state, control, **kw):
            ends.append(time.perf_counter())
            step_counts.append(tuple(pending))
            pending[:] = [0, 0, 0]

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses[state.global_step] = logs["loss"]

    trainer = Counting(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft_config,
                       callbacks=[Timer()])
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
    steps = []
    for i, (n_pairs, tokens, positions) in enumerate(step_counts):
        # ends[i + 1] - ends[i]: from the previous step's end (after its optimizer step) to this one's, data
        # fetching, both forwards, backward, clipping and optimizer step included.
        steps.append({"step": i + 1, "pairs": n_pairs, "tokens": tokens, "positions": positions,
                      "seconds": ends[i + 1] - ends[i], "loss": losses.get(i + 1)})
    return {"steps": steps, "n_params": n_params, **info, "rows": len(pairs), "fed_rows": len(prepared),
            "sequences_differing_from_posttrain": differ, "sequences_compared": 2 * len(order),
            "token_diff_vs_posttrain": token_diff, "padding_free": bool(getattr(trainer, "padding_free", False)),
            "gradient_checkpointing": bool(cfg.gradient_checkpointing),
            "optim": str(getattr(cfg.optim, "value", cfg.optim)), "numerics": trl_numerics(bf16)}


def run_worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    name = args.worker
    result = (worker_trl(args, bf16=precision(name) == "bf16") if name.startswith("trl")
              else worker_posttrain(args, name))
    measured = [s for s in result["steps"] if s["step"] > args.warmup]
    if not measured:
        raise RuntimeError("no timed step: --steps must be at least 1")
    seconds = sum(s["seconds"] for s in measured)
    n = len(measured)
    if result.get("ref_seconds"):  # one epoch: every pair trained once, and the reference pass over all of them
        pairs = sum(s["pairs"] for s in measured)
        seconds *= 1 + result["ref_seconds"] / result["pairs"] / (seconds / pairs)
    result.update(config=name, threads=torch.get_num_threads(), peak_rss_mb=peak_rss_mb(), measured_steps=n,
                  seconds=seconds, pairs_per_s=sum(s["pairs"] for s in measured) / seconds,
                  tokens_per_s=sum(s["tokens"] for s in measured) / seconds, s_per_step=seconds / n,
                  pairs_per_step=sum(s["pairs"] for s in measured) / n,
                  tokens_per_step=sum(s["tokens"] for s in measured) / n,
                  positions_per_step=sum(s["positions"] for s in measured) / n)
    Path(args.result).write_text(json.dumps(result, indent=1))


# ----------------------------------------------------------------------------------------------------------------
# Driver.

def table(results: dict[str, list[dict]], ceiling: float, warmup: int, steps: int, skip: dict[str, str]) -> str:
    """Markdown table of the per-config medians, with the pairs/s ratio against TRL's best measured configuration
    and the FLOP-ceiling share."""
    keys = ("pairs_per_s", "tokens_per_s", "peak_rss_mb", "s_per_step", "pairs_per_step", "tokens_per_step",
            "positions_per_step")
    med = medians(results, keys)
    best = best_trl(med, "pairs_per_s", higher_is_better=True)
    n_params = next(rs for rs in results.values() if rs)[0]["n_params"]
    lines = ["| config | pairs/s | tokens/s | s/step | peak RSS MB | pairs/step | tokens/step | positions/step | "
             "runs (pairs/s) | vs best TRL (pairs/s) | FLOP ceiling fraction |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c, m in med.items():
        ratio = f"{m['pairs_per_s'] / med[best]['pairs_per_s']:.2f}x" if best else "-"
        frac = m["tokens_per_s"] * 6 * n_params / (ceiling * 1e9)
        runs = ", ".join(f"{r['pairs_per_s']:.2f}" for r in results[c])
        lines.append(f"| {c} | {m['pairs_per_s']:.2f} | {m['tokens_per_s']:.1f} | {m['s_per_step']:.2f} | "
                     f"{m['peak_rss_mb']:.0f} | {m['pairs_per_step']:.1f} | {m['tokens_per_step']:.0f} | "
                     f"{m['positions_per_step']:.0f} | {runs} | {ratio} | {100 * frac:.0f}% |")
    lines += skipped_rows(skip, 11)
    notes = [f"Medians over runs (the 'runs' column lists each run's pairs/s); {steps} timed optimizer steps after "
             f"{warmup} warm-up steps per run. tokens = prompt + chosen and prompt + rejected of every pair "
             f"trained (the work of two separate sequences, what TRL feeds); positions = input tensor size as fed, "
             f"padding included (a shared prompt is fed once).",
             f"FLOP ceiling: fp32 2048x2048 matmul at {ceiling:.1f} GFLOP/s; 6 x N = 6 x {n_params / 1e6:.1f} M "
             f"FLOPs per token, so the ceiling is {ceiling * 1e9 / (6 * n_params):.0f} tokens/s (tokens as above: "
             f"a framework that computes a shared prompt once can pass 100%)."]
    if best:
        r = results[best][0]
        notes.append(f"TRL tokenisation vs posttrain's: {r['sequences_differing_from_posttrain']} of "
                     f"{r['sequences_compared']} fed sequences differ, {r['token_diff_vs_posttrain']:+d} tokens "
                     f"in all; TRL optim {r['optim']}, padding_free {r['padding_free']}, gradient checkpointing "
                     f"{r['gradient_checkpointing']}.")
    notes += ratio_summary(results, med, "pairs_per_s", "pairs/s", True, skip)
    return "\n".join(lines) + "\n\n" + "\n".join(notes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=64, help="preference pairs in the fixed training subset")
    p.add_argument("--max-len", type=int, default=256, help="token cap for prompt + response (chosen and rejected)")
    p.add_argument("--batch", type=int, default=2, help="micro-batch in pairs (TRL, posttrain, posttrain-precomp)")
    p.add_argument("--pack-rows", type=int, default=1, help="micro-batch in packed rows (posttrain-pack, -noshare)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    p.add_argument("--lr", type=float, default=5e-6)
    args, configs = start(p, CONFIGS, DEFAULT_CONFIGS, run_worker, __file__)
    if configs is None:
        return
    if not DATA.exists():
        sys.exit(f"missing {DATA}; see benchmarks/prepare_hh.py")

    common = ["--model", args.model, "--pairs", str(args.pairs), "--max-len", str(args.max_len), "--batch",
              str(args.batch), "--pack-rows", str(args.pack_rows), "--warmup", str(args.warmup), "--steps",
              str(args.steps), "--lr", str(args.lr), "--threads", str(args.threads)]

    def describe(r: dict[str, Any]) -> str:
        loss1 = r["steps"][0]["loss"]  # policy == reference at step 1 (LoRA B = 0): log 2 = 0.6931 on both
        return (f"{r['pairs_per_s']:6.2f} pairs/s {r['tokens_per_s']:7.1f} tokens/s {r['s_per_step']:6.2f} s/step "
                f"{r['tokens_per_step']:6.0f} tokens/step {r['peak_rss_mb']:6.0f} MB "
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
