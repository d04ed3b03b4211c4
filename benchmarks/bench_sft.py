"""LoRA SFT throughput: posttrain vs TRL's SFTTrainer, side by side, same model, data, LoRA and batch settings.

Each framework runs in its own subprocess (so peak RSS is per framework), alternately, for ``--rounds`` rounds;
the table reports the median per configuration. Only optimizer steps after ``--warmup`` steps are timed
(model loading, tokenisation and packing are excluded), and both sides count tokens the same way: non-padding
input tokens fed to the model (``tokens/s``) and tokens that carry loss (``trained tokens/s``).

Configurations:
  posttrain          posttrain's engine (sft_schedule + train_loop + SFT), packing=True (its default)
  posttrain-nopack   the same with packing=False (one example per row, padded to the batch's longest)
  posttrain-compile  posttrain with ``model.compile``: each decoder layer through torch.compile (compiled in the
                     warm-up steps)
  trl-pack           TRL SFTTrainer, packing=True (strategy 'bfd', which turns on padding-free batches)
  trl-pad            TRL SFTTrainer, packing=False (right padding to the batch's longest)
Each has precision variants (benchmarks/_common.py): ``<config>-bf16`` (posttrain ``model.dtype: bf16_mixed``, TRL
``bf16=True``: fp32 weights, forwards under bf16 autocast) and, for posttrain, ``<config>-auto`` (``model.dtype:
auto``, whatever choose_numerics picks here, printed with its reason). The default is the four-way comparison
posttrain, posttrain-auto, trl-pack, trl-pack-bf16; on a CPU without avx512_bf16/amx_bf16 the -bf16 ones are
skipped (with the reason in the table) unless --force-bf16. Ratios are against TRL's best measured configuration.

``--loss-check`` trains instead ``--loss-steps`` (20) steps of posttrain and posttrain-bf16 on the same batches and
reports the relative difference of their final losses (target: within 1%); it exits 1 beyond that.

Shared settings: the embedded SmolLM2-135M-Instruct in fp32 with SDPA attention, LoRA r=16 alpha=32
dropout 0 (posttrain's default; --lora-dropout) on all linear layers (q,k,v,o,gate,up,down), lr 2e-4,
AdamW, grad clip 1.0, micro-batch 4, no gradient accumulation, no gradient checkpointing, assistant-only
loss, seq length cap 512, 2 torch threads. TRL gets ``bf16=False`` (``True`` for -bf16), ``fp16=False,
use_cpu=True``; its SmolLM2 chat template has no ``{% generation %}`` tags and TRL ships no training template
for it, so TRL is fed prompt/completion conversational rows with ``completion_only_loss=True`` (the same
assistant-only mask for single-turn chats).

FLOP ceiling: LoRA training costs about 4 * N FLOPs per token (forward 2N, activation gradients 2N; frozen
weights need no weight gradients), N = the base model's parameter count including the tied embedding/head.
The attention term (about 12 * layers * T * d per token for causal attention) is left out. The fraction reported
is achieved FLOP/s divided by the fp32 2048x2048 matmul rate measured on this machine by this script (before
every run and at the end; the best reading counts, since other load on the machine only lowers it).

Set-up and run: ``make bench`` (TRL lives only in the git-ignored .bench-venv; BENCH_ARGS passes flags).

On a GPU (issue 6's H100 row): ``--device cuda --dtype bfloat16 --arch llama-3.1-8b --max-len 2048`` trains a
random-initialised model of that architecture (throughput does not depend on the weights; the tokenizer still comes
from ``--model``, a folder that may hold only tokenizer files), ``--liger`` turns on Liger's kernels for both
sides, ``--checkpointing`` activation checkpointing for both, and ``--trl-attn flash_attention_2`` (with the
flash-attn package installed) gives TRL's padding-free batches varlen attention instead of SDPA's packed-sequence
mask. The ceiling is then a bf16 8192^3 matmul on the device, and the table's last column counts causal attention's
FLOPs too (the MFU). ``--arch tiny`` tries that path on a CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# base_param_count and matmul_gflops are re-exported: sft_bound.py imports them from here.
from _common import (  # noqa: E402,F401
    REPO,
    base_config,
    base_param_count,
    best_trl,
    bf16_skips,
    expand,
    finish,
    matmul_gflops,
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

DATA = REPO.parent / "shared" / "data" / "alpaca-eval" / "gpt4_vs_davinci003_annotations.json"
CONFIGS = expand(("posttrain", "posttrain-nopack", "posttrain-compile"), ("trl-pack", "trl-pad"))
DEFAULT_CONFIGS = ("posttrain", "posttrain-auto", "trl-pack", "trl-pack-bf16")
LOSS_TOLERANCE = 0.01  # fp32 vs bf16_mixed final loss, relative: the bf16_mixed acceptance target
LORA = dict(r=16, alpha=32, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"])
SEED = 0


# ----------------------------------------------------------------------------------------------------------------
# Shared by both workers: the same chats, selected the same way.

def load_chats(n: int, max_len: int, tokenizer) -> tuple[list[list[dict]], str]:
    """The first ``n`` single-turn chats (user instruction, GPT-4 answer) that render to <= max_len - 2 tokens.

    Two tokens of slack: TRL renders prompt + completion as one chat whose trailing newline it keeps as a
    completion token, so its rendering is never longer than posttrain's by more than that.
    """
    from posttrain.data import render_example

    if DATA.exists():
        rows = json.loads(DATA.read_text())
        chats = [[{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output_2"]}]
                 for r in rows if r.get("instruction") and r.get("output_2")]
        source = f"{DATA.name} (instruction, output_2)"
    else:  # synthetic but deterministic chats of varied length
        import random

        rng = random.Random(SEED)
        words = "the a model data token train loss batch layer weight gradient step value of to and in".split()
        chats = []
        for i in range(4 * n):
            q = " ".join(rng.choice(words) for _ in range(rng.randint(8, 40)))
            a = " ".join(rng.choice(words) for _ in range(rng.randint(30, 300)))
            chats.append([{"role": "user", "content": f"Question {i}: {q}?"}, {"role": "assistant", "content": a}])
        source = "synthetic"
    keep = []
    for chat in chats:
        if len(render_example(tokenizer, chat)) <= max_len - 2:
            keep.append(chat)
            if len(keep) == n:
                break
    return keep, source


def batch_counts(batch) -> tuple[int, int]:
    """(non-padding input tokens, trained tokens) of a collated batch; the same rule for both frameworks."""
    if "attention_mask" in batch:
        tokens = int(batch["attention_mask"].sum())
    elif "num_tokens" in batch:
        tokens = int(batch["num_tokens"])
    else:  # TRL padding-free: one flattened row, nothing padded (pad_to_multiple_of is None off Neuron)
        tokens = int(batch["input_ids"].numel())
    trained = int((batch["labels"][..., 1:] != -100).sum())
    return tokens, trained


def build_model(args, attn: str, dtype):
    """The model both workers train: the ``--model`` checkpoint, or with ``--arch`` a random-initialised model of
    that architecture (throughput does not depend on the weights' values), in ``dtype`` on ``--device``."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    if args.arch:
        from gpu_check import arch_config

        torch.manual_seed(SEED)
        model = LlamaForCausalLM._from_config(arch_config(args.arch), torch_dtype=dtype, attn_implementation=attn)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation=attn)
    return model.to(args.device)


def attention_flops(config, examples) -> float:
    """Causal attention FLOPs per token, forward and backward: per layer and example of n tokens, QK^T and PV
    cost 2 n^2 d forward (half of each n x n product is masked) and twice that backward, so 6 L d sum(n^2) / sum(n)
    (each example attends only to itself, packed or not)."""
    lengths = [len(e) for e in examples]
    return 6 * config.num_hidden_layers * config.hidden_size * sum(n * n for n in lengths) / sum(lengths)


def peak_gpu_mb() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


# ----------------------------------------------------------------------------------------------------------------
# Workers (run in subprocesses).

def worker_posttrain(args, packing: bool, compiled: bool, dtype: str) -> dict:
    """``dtype``: posttrain's model.dtype (float32, bfloat16, auto or bf16_mixed)."""
    import torch

    from posttrain.config import TrainConfig
    from posttrain.data import render_example, sft_schedule
    from posttrain.engine import LoopOptions, read_metrics, train_loop
    from posttrain.methods import SFT
    from posttrain.models import apply_lora, load_model, load_tokenizer
    from posttrain.models.attention import register
    from posttrain.models.numerics import choose_numerics
    from posttrain.recipes._common import from_section, seed_everything

    seed_everything(SEED)
    numerics = choose_numerics(dtype, torch.device(args.device))  # what load_model and a recipe run choose
    if args.arch or args.device != "cpu" or numerics.weights != torch.float32:
        base = build_model(args, register(), numerics.weights)  # posttrain's attention, sdpa_packed
        tok = load_tokenizer(args.model)
    else:
        loaded = load_model(args.model, dtype=dtype, device="cpu")  # its default attention (sdpa_packed)
        base, tok = loaded.model, loaded.tokenizer
    chats, source = load_chats(args.examples, args.max_len, tok)
    examples = [render_example(tok, c) for c in chats]
    n_params = base_param_count(base)
    if args.checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    seed_everything(SEED)
    model = apply_lora(base, r=LORA["r"], alpha=LORA["alpha"], dropout=args.lora_dropout,
                       target_modules=LORA["targets"])
    if args.liger:
        from posttrain.models.kernels import apply_liger

        apply_liger(model, next(model.parameters()).device)
    if compiled:
        from posttrain.models.compile import compile_layers

        if args.checkpointing:  # as model.compile refuses it: checkpointed layers would run eagerly
            raise SystemExit("posttrain-compile with --checkpointing measures nothing compiled; drop one")
        compile_layers(model)
    plan = sft_schedule(examples, micro_batch_size=args.batch, grad_accum=1, seed=SEED, pad_id=tok.pad_token_id,
                        packing=packing, max_seq_len=args.max_len)

    counts: dict[int, tuple[int, int]] = {}

    class Counted:  # records what each optimizer step feeds the model
        def step(self, step: int):
            micro = plan.step(step)
            sums = [batch_counts(b) for b in micro]
            counts[step + 1] = (sum(s[0] for s in sums), sum(s[1] for s in sums))
            return micro

    total = args.warmup + args.steps
    opts = from_section(LoopOptions, TrainConfig(lr=args.lr, max_grad_norm=1.0, log_every=1), total_steps=total,
                        warmup_steps=0, optimizer="adamw", autocast=numerics.autocast)  # as a recipe sets it
    with tempfile.TemporaryDirectory(prefix="bench-posttrain-") as out:
        train_loop(model, SFT(), Counted(), opts, Path(out))
        records = [r for r in read_metrics(Path(out) / "metrics.jsonl") if "tokens_per_s" in r]
    steps = []
    for r in records:  # tokens_per_s = step tokens / (time from the end of the previous step's log to this one)
        tokens, trained = counts[r["step"]]
        steps.append({"step": r["step"], "tokens": tokens, "trained": trained, "seconds": tokens / r["tokens_per_s"],
                      "loss": r["loss"]})
    return {"steps": steps, "n_params": n_params, "examples": len(examples), "data": source,
            "dataset_tokens": sum(len(e) for e in examples),
            "dataset_trained": sum(e.num_trained for e in examples), "rows": len(plan.units),
            "peak_gpu_mb": peak_gpu_mb(), "attn_flops_per_token": attention_flops(base.config, examples),
            "numerics": f"posttrain {numerics.describe()}"}


def worker_trl(args, packing: bool, mixed: bool) -> dict:
    """``mixed``: fp32 weights and ``bf16=True`` (TRL's autocast); else weights in --dtype, bf16 only if that is."""
    import torch
    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.set_seed(SEED)
    tok = AutoTokenizer.from_pretrained(args.model)
    chats, source = load_chats(args.examples, args.max_len, tok)
    ds = Dataset.from_list([{"prompt": c[:1], "completion": c[1:]} for c in chats])
    weights = "float32" if mixed else args.dtype
    model = build_model(args, args.trl_attn, getattr(torch, weights))
    n_params = base_param_count(model)
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=args.lora_dropout,
                             target_modules=LORA["targets"], bias="none", task_type="CAUSAL_LM")
    out = tempfile.mkdtemp(prefix="bench-trl-")
    cfg = SFTConfig(
        output_dir=out, max_steps=args.warmup + args.steps, per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=1.0, weight_decay=0.0, seed=SEED, data_seed=SEED,
        bf16=mixed or args.dtype == "bfloat16", fp16=False, use_cpu=args.device == "cpu",
        gradient_checkpointing=args.checkpointing, use_liger_kernel=args.liger,
        max_length=args.max_len, packing=packing, completion_only_loss=True,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0,
    )

    step_counts: list[tuple[int, int]] = []
    pending = [0, 0]

    class Counting(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            t, tr = batch_counts(inputs)
            pending[0] += t
            pending[1] += tr
            return super().training_step(model, inputs, num_items_in_batch)

    ends: list[float] = []
    losses: dict[int, float] = {}

    class Timer(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            ends.clear()
            ends.append(time.perf_counter())  # step 1's start (warm-up, not measured)

        def on_step_end(self, a, state, control, **kw):
            ends.append(time.perf_counter())
            step_counts.append((pending[0], pending[1]))
            pending[0] = pending[1] = 0

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses[state.global_step] = logs["loss"]

    trainer = Counting(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft_config,
                       callbacks=[Timer()])
    prepared = trainer.train_dataset
    trainer.train()
    steps = []
    for i, (tokens, trained) in enumerate(step_counts):
        # ends[i + 1] - ends[i]: from the previous step's end (after its optimizer step) to this one's, data
        # fetching, forward, backward, clipping and optimizer step included.
        steps.append({"step": i + 1, "tokens": tokens, "trained": trained, "seconds": ends[i + 1] - ends[i],
                      "loss": losses.get(i + 1)})
    n_tokens = sum(len(x) for x in prepared["input_ids"])
    return {"steps": steps, "n_params": n_params, "examples": len(chats), "data": source, "dataset_tokens": n_tokens,
            "rows": len(prepared), "padding_free": bool(getattr(trainer, "padding_free", False)),
            "gradient_checkpointing": bool(cfg.gradient_checkpointing), "optim": str(cfg.optim),
            "peak_gpu_mb": peak_gpu_mb(), "numerics": trl_numerics(bool(cfg.bf16), weights)}


def run_worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    name, base = args.worker, base_config(args.worker)
    result = (worker_posttrain(args, packing=base != "posttrain-nopack", compiled=base == "posttrain-compile",
                               dtype=posttrain_dtype(name, args.dtype))
              if name.startswith("posttrain")
              else worker_trl(args, packing=base == "trl-pack", mixed=precision(name) == "bf16"))
    measured = [s for s in result["steps"] if s["step"] > args.warmup]
    seconds = sum(s["seconds"] for s in measured)
    result.update(config=name, threads=torch.get_num_threads(), peak_rss_mb=peak_rss_mb(),
                  measured_steps=len(measured), seconds=seconds,
                  tokens_per_s=sum(s["tokens"] for s in measured) / seconds,
                  trained_per_s=sum(s["trained"] for s in measured) / seconds,
                  s_per_step=seconds / len(measured),
                  tokens_per_step=sum(s["tokens"] for s in measured) / len(measured))
    Path(args.result).write_text(json.dumps(result, indent=1))


# ----------------------------------------------------------------------------------------------------------------
# Driver.

def table(results: dict[str, list[dict]], ceiling: float, warmup: int, steps: int, device: str = "cpu",
          dtype: str = "float32", skip: dict[str, str] | None = None) -> str:
    gpu, skip = device != "cpu", skip or {}
    mem = "peak_gpu_mb" if gpu else "peak_rss_mb"
    med = medians(results, ("tokens_per_s", "trained_per_s", mem, "s_per_step", "tokens_per_step"))
    best = best_trl(med, "tokens_per_s", higher_is_better=True)
    n_params = next(rs for rs in results.values() if rs)[0]["n_params"]
    attn = next((rs[0]["attn_flops_per_token"] for rs in results.values() if rs and "attn_flops_per_token" in rs[0]),
                None)
    lines = [f"| config | tokens/s | trained tokens/s | peak {'GPU' if gpu else 'RSS'} MB | s/step | tokens/step | "
             f"runs | vs best TRL (tokens/s) | FLOP ceiling fraction (4N) | with attention |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c, m in med.items():
        ratio = f"{m['tokens_per_s'] / med[best]['tokens_per_s']:.2f}x" if best else "-"
        frac = m["tokens_per_s"] * 4 * n_params / (ceiling * 1e9)
        with_attn = f"{100 * m['tokens_per_s'] * (4 * n_params + attn) / (ceiling * 1e9):.0f}%" if attn else "-"
        runs = ", ".join(f"{r['tokens_per_s']:.1f}" for r in results[c])
        lines.append(f"| {c} | {m['tokens_per_s']:.1f} | {m['trained_per_s']:.1f} | {m[mem]:.0f} | "
                     f"{m['s_per_step']:.2f} | {m['tokens_per_step']:.0f} | {runs} | {ratio} | {100 * frac:.0f}% | "
                     f"{with_attn} |")
    lines += skipped_rows(skip, 10)
    kind = f"{dtype} 8192x8192 matmul on {device}" if gpu else "fp32 2048x2048 matmul"
    notes = [f"Medians over runs (the 'runs' column lists each run's tokens/s); {steps} timed optimizer steps after "
             f"{warmup} warm-up steps per run.",
             f"FLOP ceiling: {kind} at {ceiling:.1f} GFLOP/s; 4 x N = 4 x {n_params / 1e6:.1f} M "
             f"FLOPs per token, so the ceiling is {ceiling * 1e9 / (4 * n_params):.0f} tokens/s."]
    if attn:
        notes.append(f"'with attention' adds causal attention's {attn / 1e6:.1f} M FLOPs per token (forward and "
                     "backward, from the examples' lengths): the MFU.")
    notes += ratio_summary(results, med, "tokens_per_s", "tokens/s", True, skip)
    return "\n".join(lines) + "\n\n" + "\n".join(notes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--examples", type=int, default=128, help="chats in the fixed training subset")
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=4, help="micro-batch (sequences or packed rows)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lora-dropout", type=float, default=0.0,
                   help="LoRA dropout for both frameworks; 0 is posttrain's default")
    from gpu_check import ARCHS

    p.add_argument("--arch", choices=sorted(ARCHS), default=None,
                   help="random-initialised model of this architecture (tokenizer from --model) instead of --model")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--liger", action="store_true", help="Liger kernels for both (posttrain model.liger, TRL "
                   "use_liger_kernel); CUDA only")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing for both")
    p.add_argument("--trl-attn", default="sdpa", help="TRL's attn_implementation (e.g. flash_attention_2 on a GPU)")
    p.add_argument("--loss-check", action="store_true", help="instead of the benchmark: --loss-steps steps of "
                   "posttrain and posttrain-bf16 (bf16_mixed) on the same batches, final losses compared")
    p.add_argument("--loss-steps", type=int, default=20)
    args, configs = start(p, CONFIGS, DEFAULT_CONFIGS, run_worker, __file__)
    if configs is None:
        return
    if args.loss_check and args.dtype != "float32":
        p.error("--loss-check compares fp32 with bf16_mixed; drop --dtype")
    if args.loss_check:  # every step counts and bf16 runs even where it is slow: the check asks for it
        configs, args.warmup, args.steps, args.rounds = ["posttrain", "posttrain-bf16"], 0, args.loss_steps, 1

    common = ["--model", args.model, "--examples", str(args.examples), "--max-len", str(args.max_len), "--batch",
              str(args.batch), "--warmup", str(args.warmup), "--steps", str(args.steps), "--lr", str(args.lr),
              "--lora-dropout", str(args.lora_dropout), "--threads", str(args.threads), "--device", args.device,
              "--dtype", args.dtype, "--trl-attn", args.trl_attn, *(["--arch", args.arch] if args.arch else []),
              *(["--liger"] if args.liger else []), *(["--checkpointing"] if args.checkpointing else [])]

    def describe(r: dict) -> str:
        gpu = "" if r.get("peak_gpu_mb") is None else f"(GPU {r['peak_gpu_mb']:.0f} MB) "
        return (f"{r['tokens_per_s']:7.1f} tokens/s {r['trained_per_s']:7.1f} trained/s {r['s_per_step']:6.2f} s/step "
                f"{r['tokens_per_step']:6.0f} tokens/step {r['peak_rss_mb']:6.0f} MB {gpu}"
                f"(data: {r['examples']} chats, {r['dataset_tokens']} tokens, {r['rows']} rows)")

    skip = {} if args.loss_check else bf16_skips(args, configs)
    results, ceilings = run_rounds(args, configs, common, __file__, describe, skip)
    if args.loss_check:
        sys.exit(loss_check(results, args))
    finish(args, results, ceilings, table(results, max(ceilings), args.warmup, args.steps, args.device, args.dtype,
                                          skip))


def loss_check(results: dict[str, list[dict]], args: argparse.Namespace) -> int:
    """Print both runs' losses and their final relative difference; 0 if within LOSS_TOLERANCE, else 1. Both train
    on the same batches in the same order from the same LoRA init, so step by step the losses are comparable."""
    runs = [results[c][0]["steps"] for c in ("posttrain", "posttrain-bf16")]
    ref, mixed = ([s["loss"] for s in steps] for steps in runs)
    rel = [abs(b - a) / abs(a) for a, b in zip(ref, mixed)]
    print(f"\nloss check: {len(ref)} steps, --max-len {args.max_len} --examples {args.examples} --batch "
          f"{args.batch}, lr {args.lr}")
    print("| step | loss fp32 | loss bf16_mixed | relative difference | s fp32 | s bf16_mixed |\n"
          "|---:|---:|---:|---:|---:|---:|")
    for i, (a, b, r, sa, sb) in enumerate(zip(ref, mixed, rel, *runs), 1):
        print(f"| {i} | {a:.5f} | {b:.5f} | {100 * r:.3f}% | {sa['seconds']:.2f} | {sb['seconds']:.2f} |")
    ok = rel[-1] <= LOSS_TOLERANCE
    print(f"final loss: fp32 {ref[-1]:.5f}, bf16_mixed {mixed[-1]:.5f}, relative difference {100 * rel[-1]:.3f}% "
          f"(largest over the steps {100 * max(rel):.3f}%; target <= {100 * LOSS_TOLERANCE:.0f}%): "
          f"{'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    main()
