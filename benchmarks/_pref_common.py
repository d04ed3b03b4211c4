"""What bench_dpo's workers share: the pairs (and their unpaired rows for KTO), selected and ordered the same way on
both sides; the settings every preference configuration trains with; posttrain's timed loop; TRL's step clock.

Nothing here imports torch, transformers or TRL at module level: the driver imports this module too, and only the
workers (subprocesses) pay for those imports.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from _common import base_param_count

if TYPE_CHECKING:
    from posttrain.data import Pair, StepSchedule, Unpaired

DATA = Path(__file__).resolve().parents[2] / "shared/data/hh-rlhf/harmless-base-test.jsonl.gz"
LORA = dict(r=16, alpha=32, dropout=0.0, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"])
BETA = 0.1
SEED = 0


# ----------------------------------------------------------------------------------------------------------------
# Data.

def load_pairs(data: Path, n: int, max_len: int,
               tokenizer) -> tuple[list[Pair], list[dict[str, Any]], dict[str, Any]]:
    """(posttrain Pairs, the same pairs as TRL conversational rows, data info) for the first ``n`` pairs of ``data``
    whose chosen and rejected renderings both fit in ``max_len`` tokens.

    posttrain's own ``build_pairs`` decides the fit (on a temporary JSONL of a growing prefix of the file), so the
    rule is exactly the one a posttrain run applies with ``overlong: drop, bad_pairs: drop``.
    """
    from posttrain.data import build_pairs, read_rows, row_to_pair

    rows = [r for _, r in read_rows(data)]
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
        prompt, chosen, rejected = row_to_pair(rows[p.row - 1], str(data), p.row)
        if prompt != p.prompt:
            raise RuntimeError(f"row {p.row}: the prompt re-parsed for TRL differs from posttrain's")
        convs.append({"prompt": p.prompt, "chosen": chosen, "rejected": rejected})
    info = {"data": f"{data.name}: first {len(pairs)} pairs fitting {max_len} tokens, from rows 1-{pairs[-1].row}",
            "pairs": len(pairs), "last_row": pairs[-1].row,
            "bad_in_prefix": sum(1 for num, _ in report.bad if num <= pairs[-1].row),
            "overlong_in_prefix": sum(1 for num in report.dropped_overlong if num <= pairs[-1].row),
            "dataset_tokens": sum(len(p) for p in pairs)}
    return pairs, convs, info


def load_unpaired(data: Path, n: int, max_len: int, tokenizer) -> tuple[list[Unpaired], dict[str, Any]]:
    """The unpaired rows of ``load_pairs``' pairs, as ``posttrain data unpair`` writes them (``curate.unpair``: each
    pair's chosen response a desirable row, then its rejected one an undesirable row, pair by pair), rendered by
    ``data.build_unpaired``; a row over ``max_len`` is an error (both of its pair's sequences fit)."""
    from posttrain.curate.unpair import unpaired_rows
    from posttrain.data import build_unpaired, read_rows

    pairs, _, info = load_pairs(data, n, max_len, tokenizer)
    sources = [r for _, r in read_rows(data)]
    sources = [sources[p.row - 1] for p in pairs]
    with tempfile.TemporaryDirectory(prefix="bench-kto-data-") as tmp:
        src, out = Path(tmp) / "pairs.jsonl", Path(tmp) / "unpaired.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in sources))
        records, counts = unpaired_rows(src)
        if counts["rows"] != 2 * len(pairs):
            raise RuntimeError(f"{len(pairs)} pairs gave {counts['rows']} unpaired rows, expected {2 * len(pairs)}")
        out.write_text("".join(json.dumps(r) + "\n" for r in records))
        rows, report = build_unpaired(str(out), tokenizer, max_seq_len=max_len, overlong="error")
    info.update(data=info["data"] + f", unpaired into {len(rows)} rows ({report.desirable} desirable, "
                f"{report.undesirable} undesirable)", dataset_tokens=report.tokens)
    return rows, info


def response_span(trained: list[bool]) -> tuple[int, int]:
    """[start, end) of the trained tokens of a rendered sequence: the response and its end-of-turn token."""
    on = [i for i, t in enumerate(trained) if t]
    return on[0], on[-1] + 1


def make_plan(pairs: list[Pair], batch: int, pad_id: int, packing: bool, max_len: int,
              share_prompt: bool = True) -> StepSchedule:
    from posttrain.data import pair_schedule

    return pair_schedule(pairs, micro_batch_size=batch, grad_accum=1, seed=SEED, pad_id=pad_id, packing=packing,
                         max_seq_len=max_len, share_prompt=share_prompt)


# ----------------------------------------------------------------------------------------------------------------
# posttrain: the engine's train_loop, with what each step trained counted on the side.

def posttrain_steps(model, method, plan: StepSchedule, count: Callable[[list], dict[str, float]],
                    args: argparse.Namespace, autocast) -> list[dict[str, Any]]:
    """Train ``args.warmup + args.steps`` optimizer steps of ``plan`` with posttrain's ``train_loop`` and ``method``
    (lr ``args.lr`` constant, AdamW, grad clip 1.0, as a recipe run). Returns one dict per step: ``count`` of its
    micro-batches (pairs, tokens, positions, FLOP weight ...), its seconds and loss."""
    from posttrain.config import TrainConfig
    from posttrain.engine import LoopOptions, read_metrics, train_loop
    from posttrain.recipes._common import from_section

    counts: dict[int, dict[str, float]] = {}

    class Counted:
        def step(self, step: int):
            micro = plan.step(step)
            counts[step + 1] = {**count(micro), "fed": sum(int(b["num_tokens"]) for b in micro)}
            return micro

    # min_lr_ratio=1 turns posttrain's warmup-cosine schedule into a constant lr, as TRL's "constant".
    opts = from_section(LoopOptions, TrainConfig(lr=args.lr, min_lr_ratio=1.0, max_grad_norm=1.0, log_every=1),
                        total_steps=args.warmup + args.steps, warmup_steps=0, optimizer="adamw", autocast=autocast)
    with tempfile.TemporaryDirectory(prefix="bench-posttrain-") as out:
        train_loop(model, method, Counted(), opts, Path(out))
        records = [r for r in read_metrics(Path(out) / "metrics.jsonl") if "tokens_per_s" in r]
    steps = []
    for r in records:  # tokens_per_s = fed tokens / (time from the end of the previous step's log to this one)
        c = dict(counts[r["step"]])
        fed = c.pop("fed")
        steps.append({"step": r["step"], **c, "seconds": fed / r["tokens_per_s"], "loss": r["loss"]})
    return steps


# ----------------------------------------------------------------------------------------------------------------
# TRL: the shared settings, and a clock around its training steps.

def trl_setup() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.set_seed(SEED)


def trl_model(args: argparse.Namespace):
    """(the model in fp32 with SDPA, its base parameter count, the LoRA config of every configuration)."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules=LORA["targets"], bias="none", task_type="CAUSAL_LM")
    return model, base_param_count(model), peft_config


def trl_args(args: argparse.Namespace, out: str, batch: int, bf16: bool) -> dict[str, Any]:
    """The TrainingArguments every TRL configuration shares (its config class adds the method's own): constant lr
    without warmup, AdamW without weight decay, grad clip 1.0, sequential sampling (the data comes in posttrain's
    order), and the defaults TRL's preference configs change turned back (bf16, gradient checkpointing)."""
    return dict(output_dir=out, max_steps=args.warmup + args.steps, per_device_train_batch_size=batch,
                gradient_accumulation_steps=1, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
                max_grad_norm=1.0, weight_decay=0.0, seed=SEED, data_seed=SEED, train_sampling_strategy="sequential",
                bf16=bf16, fp16=False, use_cpu=True, gradient_checkpointing=False, logging_steps=1,
                save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
                dataloader_num_workers=0)


class TRLClock:
    """Counts what each TRL optimizer step trains (``count(inputs)`` per micro-batch, summed) and times it, from the
    previous step's end (after its optimizer step) to this one's: data fetching, forwards, backward, clipping and
    optimizer step included."""

    def __init__(self, count: Callable[[dict[str, Any]], dict[str, float]]):
        self.count, self.pending, self.counts = count, {}, []
        self.ends: list[float] = []
        self.losses: dict[int, float] = {}

    def trainer(self, base: type) -> type:
        clock = self

        class Counting(base):
            def training_step(self, model, inputs, num_items_in_batch=None):
                for k, v in clock.count(inputs).items():
                    clock.pending[k] = clock.pending.get(k, 0) + v
                return super().training_step(model, inputs, num_items_in_batch)

        return Counting

    def callback(self):
        import time

        from transformers import TrainerCallback

        clock = self

        class Timer(TrainerCallback):
            def on_train_begin(self, a, state, control, **kw):
                clock.ends[:] = [time.perf_counter()]  # step 1's start (warm-up, not measured)

            def on_step_end(self, a, state, control, **kw):
                clock.ends.append(time.perf_counter())
                clock.counts.append(clock.pending)
                clock.pending = {}

            def on_log(self, a, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    clock.losses[state.global_step] = logs["loss"]

        return Timer()

    def steps(self) -> list[dict[str, Any]]:
        return [{"step": i + 1, **c, "seconds": self.ends[i + 1] - self.ends[i], "loss": self.losses.get(i + 1)}
                for i, c in enumerate(self.counts)]
