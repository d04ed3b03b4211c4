"""bench_dpo's KTO and ORPO workers: posttrain (its real blocks, as ``posttrain kto`` and ``posttrain dpo
dpo.loss=orpo`` build them) and TRL (``KTOTrainer``, ``trl.experimental.orpo.ORPOTrainer``) on the same rows.

Each step dict counts ``pairs`` (KTO: rows / 2, the pairs its rows came from), ``tokens`` (non-padding tokens fed,
counted from each side's own batches), ``positions`` (input tensor sizes, padding included) and ``work`` (tokens
weighted by the FLOPs they cost, in units of N = base parameters: 4 for a policy forward and backward, +2 for a
reference forward, 2 for a no-grad forward), which the table turns into the FLOP-ceiling share.

Why TRL gets text rather than chat messages here (its tokenisation is checked against posttrain's, sequence by
sequence, either way):
- KTO: TRL's conversational path tokenises prompt + completion through the chat template, whose trailing newline
  after ``<|im_end|>`` then ends every completion, and so every mismatched (KL) sequence; posttrain's unpaired rows
  end at ``<|im_end|>`` so that another row's completion can follow a prompt. Given the rendered prompt and
  completion as text, TRL tokenises exactly posttrain's sequences, the KL ones included.
- ORPO: TRL's ORPO tokeniser appends an EOS to a response that does not end in one, i.e. after the template's
  newline, a trained token posttrain does not have. Given the response as text through its ``<|im_end|>``, TRL
  trains exactly posttrain's tokens; posttrain's sequence keeps the untrained trailing newline (the last input
  position, which predicts nothing), one position TRL does not feed, so the comparison stops at the end-of-turn.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from typing import TYPE_CHECKING, Any

from _common import base_config, base_param_count, posttrain_dtype, trl_numerics
from _pref_common import (
    BETA,
    LORA,
    SEED,
    TRLClock,
    load_pairs,
    load_unpaired,
    make_plan,
    posttrain_steps,
    response_span,
    trl_args,
    trl_model,
    trl_setup,
)

if TYPE_CHECKING:
    from posttrain.data import Pair, StepSchedule, Unpaired

ORPO_LAMBDA = 0.1  # the paper's lambda: posttrain's dpo.orpo_lambda, TRL's ORPOConfig.beta


def _posttrain_model(args: argparse.Namespace, name: str):
    from posttrain.models import apply_lora, load_model
    from posttrain.recipes._common import seed_everything

    seed_everything(SEED)
    loaded = load_model(args.model, dtype=posttrain_dtype(name), device="cpu")  # its default attention
    n_params = base_param_count(loaded.model)
    seed_everything(SEED)
    model = apply_lora(loaded.model, r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"],
                       target_modules=LORA["targets"])
    return loaded, model, n_params


# ----------------------------------------------------------------------------------------------------------------
# KTO.

def kto_plan(rows: list[Unpaired], micro_rows: int, pad_id: int, max_len: int) -> StepSchedule:
    from posttrain.methods.kto import kto_schedule

    return kto_schedule(rows, micro_batch_size=micro_rows, grad_accum=1, seed=SEED, pad_id=pad_id,
                        max_seq_len=max_len)


def _kto_count(rows: int, own: int, mismatched: int, positions: int) -> dict[str, float]:
    # own sequences: policy forward + backward and a reference forward; mismatched ones (z0): two no-grad forwards
    return {"rows": rows, "pairs": rows / 2, "tokens": own + mismatched, "positions": positions,
            "work": 6 * own + 4 * mismatched}


def worker_posttrain_kto(args: argparse.Namespace, name: str) -> dict[str, Any]:
    from posttrain.config import KTOSection, TrainConfig
    from posttrain.methods.kto import KTOMethod
    from posttrain.models.reference import make_reference
    from posttrain.recipes._common import disable_dropout
    from posttrain.recipes.kto import kto_params

    loaded, model, n_params = _posttrain_model(args, name)
    tok = loaded.tokenizer
    rows, info = load_unpaired(args.data, args.pairs, args.max_len, tok)
    disable_dropout(model, "KTO")
    chunk = TrainConfig().loss_chunk_size
    # As recipes.kto.run: the class weights through kto_params (given as 1 and 1, TRL's defaults; the rows are
    # balanced, so the suggested weights would be the same), the reference the policy with adapters disabled.
    params, weights = kto_params(KTOSection(beta=BETA, desirable_weight=1.0, undesirable_weight=1.0), rows)
    method = KTOMethod(params, make_reference(model, lora=True, per_token=True, chunk_size=chunk), chunk)
    plan = kto_plan(rows, args.kto_rows, tok.pad_token_id, args.max_len)

    def count(micro: list) -> dict[str, float]:
        return _kto_count(sum(int(b["desirable"].numel()) for b in micro),
                          sum(int(b["own"]["num_tokens"]) for b in micro),
                          sum(int(b["mismatched"]["num_tokens"]) for b in micro),
                          sum(b["own"]["input_ids"].numel() + b["mismatched"]["input_ids"].numel() for b in micro))

    steps = posttrain_steps(model, method, plan, count, args, loaded.numerics.autocast)
    return {"steps": steps, "n_params": n_params, **info, "rows": len(rows), "kto_weights": weights["line"],
            "numerics": f"posttrain {loaded.numerics.describe()}"}


def trl_kto_count(inputs: dict[str, Any]) -> dict[str, float]:
    """What one TRL KTO micro-batch feeds: each row's own sequence and its KL (mismatched) sequence, right-padded;
    other layouts are refused rather than miscounted."""
    need = ("input_ids", "attention_mask", "KL_input_ids", "KL_attention_mask", "label")
    if any(k not in inputs for k in need):
        raise RuntimeError(f"unexpected TRL KTO batch layout {sorted(inputs)}; update trl_kto_count")
    return _kto_count(inputs["label"].numel(), int(inputs["attention_mask"].sum()),
                      int(inputs["KL_attention_mask"].sum()),
                      inputs["input_ids"].numel() + inputs["KL_input_ids"].numel())


def worker_trl_kto(args: argparse.Namespace, bf16: bool) -> dict[str, Any]:
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    from posttrain.losses.kto import mismatched_order
    from posttrain.models import load_tokenizer

    trl_setup()
    tok = load_tokenizer(args.model)
    rows, info = load_unpaired(args.data, args.pairs, args.max_len, tok)
    n_rows, total = args.kto_rows, args.warmup + args.steps
    # posttrain's row order, micro-batch by micro-batch. TRL pairs each row with the previous row's completion for
    # its KL term within consecutive groups of per_device_train_batch_size rows, the same rotation posttrain applies
    # within a micro-batch, so equal micro-batches mean equal mismatched sequences; a short one would shift it.
    plan = kto_plan(rows, n_rows, tok.pad_token_id, args.max_len)
    groups = [b["row_index"].tolist() for s in range(total) for b in plan.step(s)]
    if any(len(g) != n_rows for g in groups):
        raise RuntimeError(f"a posttrain micro-batch has other than {n_rows} rows: {[len(g) for g in groups]}")
    order = [i for g in groups for i in g]
    texts = [{"prompt": tok.decode(r.prompt_ids), "completion": tok.decode(r.completion_ids), "label": r.label}
             for r in rows]
    ds = Dataset.from_list([texts[i] for i in order])
    model, n_params, peft_config = trl_model(args)
    out = tempfile.mkdtemp(prefix="bench-trl-kto-")
    cfg = KTOConfig(**trl_args(args, out, n_rows, bf16), max_length=args.max_len, loss_type="kto", beta=BETA,
                    desirable_weight=1.0, undesirable_weight=1.0, precompute_ref_log_probs=False)
    clock = TRLClock(trl_kto_count)
    trainer = clock.trainer(KTOTrainer)(model=model, args=cfg, train_dataset=ds, processing_class=tok,
                                        peft_config=peft_config, callbacks=[clock.callback()])
    if not trainer.calculate_KL:
        raise RuntimeError("TRL's KTO runs without its KL (z0) estimate; posttrain's always has it")
    prepared = trainer.train_dataset
    if len(prepared) != len(order):
        raise RuntimeError(f"TRL kept {len(prepared)} of {len(order)} rows; nothing should be filtered")
    differ, token_diff, cap = 0, 0, args.max_len
    rotation = mismatched_order(n_rows)
    for k, ex in enumerate(prepared):
        g, j = groups[k // n_rows], k % n_rows
        r, other = rows[g[j]], rows[g[rotation[j]]]
        own = r.prompt_ids + r.completion_ids
        mis = r.prompt_ids + other.completion_ids[:max(1, cap - len(r.prompt_ids))]  # as collate_unpaired cuts it
        trl_own = (ex["prompt_ids"] + ex["completion_ids"])[:cap]  # as TRL's collator cuts at max_length
        trl_mis = (ex["prompt_ids"] + ex["KL_completion_ids"])[:cap]
        differ += (trl_own != own) + (trl_mis != mis)
        token_diff += len(trl_own) + len(trl_mis) - len(own) - len(mis)
    trainer.train()
    shutil.rmtree(out, ignore_errors=True)  # save_strategy="no": nothing in it worth keeping
    return {"steps": clock.steps(), "n_params": n_params, **info, "rows": len(rows), "fed_rows": len(prepared),
            "sequences_differing_from_posttrain": differ, "sequences_compared": 2 * len(order),
            "token_diff_vs_posttrain": token_diff, "kl_estimate": bool(trainer.calculate_KL),
            "padding_free": False, "gradient_checkpointing": bool(cfg.gradient_checkpointing),
            "optim": str(getattr(cfg.optim, "value", cfg.optim)), "numerics": trl_numerics(bf16)}


# ----------------------------------------------------------------------------------------------------------------
# ORPO.

def _pair_count(micro: list, pairs: list[Pair]) -> dict[str, float]:
    tokens = sum(len(pairs[i]) for b in micro for i in b["pair_index"].tolist())
    # reference-free: a policy forward and backward per token, nothing else
    return {"pairs": sum(len(b["pair_index"]) for b in micro), "tokens": tokens,
            "positions": sum(b["input_ids"].numel() for b in micro), "work": 4 * tokens}


def worker_posttrain_orpo(args: argparse.Namespace, name: str) -> dict[str, Any]:
    from posttrain.config import DPOSection
    from posttrain.methods import PreferenceMethod
    from posttrain.recipes._common import disable_dropout
    from posttrain.recipes.dpo import preference_params

    loaded, model, n_params = _posttrain_model(args, name)
    tok = loaded.tokenizer
    pairs, _, info = load_pairs(args.data, args.pairs, args.max_len, tok)
    disable_dropout(model, "ORPO")
    # As recipes.dpo.run with dpo.loss=orpo: build_reference returns no reference for a reference-free loss, so
    # no reference forward runs.
    section = DPOSection(loss="orpo", beta=BETA, orpo_lambda=ORPO_LAMBDA)
    method = PreferenceMethod(section.loss, preference_params(section), None)
    plan = make_plan(pairs, args.batch, tok.pad_token_id, False, args.max_len)  # the DPO "posttrain" batches
    steps = posttrain_steps(model, method, plan, lambda micro: _pair_count(micro, pairs), args,
                            loaded.numerics.autocast)
    return {"steps": steps, "n_params": n_params, **info, "rows": len(plan.units),
            "numerics": f"posttrain {loaded.numerics.describe()}"}


def trl_orpo_count(inputs: dict[str, Any]) -> dict[str, float]:
    """What one TRL ORPO micro-batch feeds: chosen rows then rejected rows, all padded to the longer of the two."""
    need = ("chosen_input_ids", "chosen_attention_mask", "rejected_input_ids", "rejected_attention_mask")
    if any(k not in inputs for k in need):
        raise RuntimeError(f"unexpected TRL ORPO batch layout {sorted(inputs)}; update trl_orpo_count")
    n = inputs["chosen_input_ids"].shape[0]
    tokens = int(inputs["chosen_attention_mask"].sum()) + int(inputs["rejected_attention_mask"].sum())
    width = max(inputs["chosen_input_ids"].shape[1], inputs["rejected_input_ids"].shape[1])
    return {"pairs": n, "tokens": tokens, "positions": 2 * n * width, "work": 4 * tokens}


def _orpo_text(p: Pair, tok) -> tuple[dict[str, str], list[int], list[int], int]:
    """The pair as TRL text (prompt, and each response through its end-of-turn), the two sequences TRL should
    tokenise, and the prompt length."""
    c0, c1 = response_span(p.chosen.trained)
    r0, r1 = response_span(p.rejected.trained)
    prompt = p.chosen.input_ids[:c0]
    if p.rejected.input_ids[:r0] != prompt:
        raise RuntimeError(f"row {p.row}: chosen and rejected are rendered after different prompts")
    chosen, rejected = p.chosen.input_ids[:c1], p.rejected.input_ids[:r1]
    text = {"prompt": tok.decode(prompt), "chosen": tok.decode(chosen[c0:]), "rejected": tok.decode(rejected[r0:])}
    return text, chosen, rejected, c0


def worker_trl_orpo(args: argparse.Namespace, bf16: bool) -> dict[str, Any]:
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from posttrain.models import load_tokenizer

    trl_setup()
    tok = load_tokenizer(args.model)
    pairs, _, info = load_pairs(args.data, args.pairs, args.max_len, tok)
    plan = make_plan(pairs, args.batch, tok.pad_token_id, False, args.max_len)
    order = [int(i) for s in range(args.warmup + args.steps) for b in plan.step(s) for i in b["pair_index"]]
    rendered = [_orpo_text(p, tok) for p in pairs]
    ds = Dataset.from_list([rendered[i][0] for i in order])
    model, n_params, peft_config = trl_model(args)
    out = tempfile.mkdtemp(prefix="bench-trl-orpo-")
    # max_length caps prompt + response, which fits --max-len for every pair: nothing is truncated.
    cfg = ORPOConfig(**trl_args(args, out, args.batch, bf16), max_length=args.max_len, beta=ORPO_LAMBDA,
                     remove_unused_columns=False)
    clock = TRLClock(trl_orpo_count)
    trainer = clock.trainer(ORPOTrainer)(model=model, args=cfg, train_dataset=ds, processing_class=tok,
                                         peft_config=peft_config, callbacks=[clock.callback()])
    prepared = trainer.train_dataset
    if len(prepared) != len(order):
        raise RuntimeError(f"TRL kept {len(prepared)} of {len(order)} rows; nothing should be filtered")
    differ, token_diff = 0, 0
    for i, ex in zip(order, prepared):
        _, chosen, rejected, n_prompt = rendered[i]
        for side, ids in (("chosen", chosen), ("rejected", rejected)):
            trained_from = next(t for t, label in enumerate(ex[f"{side}_labels"]) if label != -100)
            differ += ex[f"{side}_input_ids"] != ids or trained_from != n_prompt
            token_diff += len(ex[f"{side}_input_ids"]) - len(ids)
    trainer.train()
    shutil.rmtree(out, ignore_errors=True)
    return {"steps": clock.steps(), "n_params": n_params, **info, "rows": len(pairs), "fed_rows": len(prepared),
            "sequences_differing_from_posttrain": differ, "sequences_compared": 2 * len(order),
            "token_diff_vs_posttrain": token_diff, "padding_free": False,
            "gradient_checkpointing": bool(cfg.gradient_checkpointing),
            "optim": str(getattr(cfg.optim, "value", cfg.optim)), "numerics": trl_numerics(bf16)}


WORKERS = {"posttrain-kto": worker_posttrain_kto, "posttrain-orpo": worker_posttrain_orpo}
TRL_WORKERS = {"trl-kto": worker_trl_kto, "trl-orpo": worker_trl_orpo}


def run_pref_worker(args: argparse.Namespace, name: str, bf16: bool) -> dict[str, Any] | None:
    """The KTO / ORPO worker for configuration ``name`` (any precision suffix), or None for a DPO one."""
    base = base_config(name)
    if base in TRL_WORKERS:
        return TRL_WORKERS[base](args, bf16)
    if base in WORKERS:
        return WORKERS[base](args, name)
    return None
