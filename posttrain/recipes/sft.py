"""`posttrain sft`: supervised fine-tuning (LoRA, QLoRA or full) on chats, with the loss on assistant tokens only.

rows -> rendered examples (assistant mask) [+ data.mix rows, + data.replay: the base model's own answers]
-> LoRA or full model -> methods.sft.SFT (token cross-entropy sum, optionally + kl_to_base) -> engine.train_loop
-> adapter/ or model/, samples.jsonl, summary.json, report.html.
Data parallel under torchrun (the batches split by rank; rank 0 writes the results).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch

from posttrain.config import DataConfig, SFTConfig
from posttrain.data import build_examples, eval_batches, held_out, load_prompt_chats, sft_schedule
from posttrain.data.mixing import mix_counts, sample_rows
from posttrain.data.render import Example
from posttrain.data.templates import resolve_template
from posttrain.engine import console, train_loop
from posttrain.engine.distributed import world
from posttrain.engine.resume import Resume
from posttrain.errors import ConfigError
from posttrain.eval import heldout_loss, sample_generations
from posttrain.io import atomic_write_text
from posttrain.methods import SFT
from posttrain.recipes._common import (
    announce,
    begin_run,
    loop_options,
    lora_export,
    prepare_model,
    rank0_after,
    save_config,
    save_trained,
    shard_if_asked,
    write_summary,
)
from posttrain.recipes._resume import check_resume
from posttrain.rollout import generate


def run(cfg: SFTConfig, *, resume: bool | Resume = False) -> dict[str, Any]:
    """Supervised fine-tuning (LoRA or full); writes adapter/model, config.yaml, metrics.jsonl, summary.json."""
    start = check_resume(cfg, resume)  # a changed config is refused here, before anything is loaded or written
    job = begin_run(cfg)
    tok = job.tokenizer
    train, held, held_chats, lines = prepare_data(cfg.data, tok)
    announce("data", lines)

    model, report = prepare_model(cfg, job.loaded)
    train, mix_lines = mix_in(cfg, train, model, tok, job.out)
    lines += mix_lines
    announce("data", mix_lines)

    t = cfg.train
    w = world()
    schedule = sft_schedule(train, micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum, seed=t.seed,
                            pad_id=tok.pad_token_id, packing=cfg.data.packing, max_seq_len=cfg.data.max_seq_len,
                            world_size=w.size, rank=w.rank)
    total = t.max_steps or schedule.steps_for(t.epochs)
    console.print(f"training {total} steps: {len(schedule.units)} {schedule.unit_name} x "
                  f"{schedule.epochs_text(total, t.epochs)}, {schedule.per_step} per step ({t.micro_batch_size} x "
                  f"{t.grad_accum} accumulation){schedule.repeat_warning()}")
    held_batches = eval_batches(held, t.micro_batch_size, tok.pad_token_id) if held else []
    evaluate = (lambda m: heldout_loss(m, held_batches, t.loss_chunk_size)) if held_batches else None
    save_config(job.out, cfg)
    sharded = shard_if_asked(cfg, model)
    records = train_loop(model, SFT(t.loss_chunk_size, cfg.kl_to_base), schedule,
                         loop_options(t, total, cfg.model, job.loaded), job.out, evaluate=evaluate,
                         export=lora_export(cfg.finetune, model), resume=start)
    if not rank0_after(model, sharded):  # rank 0 writes the results; the others hold the same weights
        return {}

    final_dir = save_trained(model, tok, job.out, cfg.finetune)
    samples = []
    if cfg.eval_samples and held_chats:
        shown = held_chats[:cfg.eval_samples]
        samples = sample_generations(model, tok, [c for c, _ in shown], tools=[t for _, t in shown],
                                     chat_template=resolve_template(cfg.data.chat_template))
        atomic_write_text(job.out / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
    summary, evals = write_summary(job, total, report, lines, records, final_dir, "eval/loss")
    if evals:
        console.print(f"held-out loss {evals[0]['eval/loss']:.4f} -> {evals[-1]['eval/loss']:.4f} "
                      f"(ppl {evals[0]['eval/ppl']:.2f} -> {evals[-1]['eval/ppl']:.2f})")
    console.print(f"saved {final_dir}")
    return {**summary, "samples": samples}


def prepare_data(dcfg: DataConfig, tokenizer: Any) -> tuple[list[Example], list[Example],
                                                             list[tuple[list[dict], Any]], list[str]]:
    """Train and held-out examples, held-out (chat, tools) pairs (for samples), and report lines."""
    template = resolve_template(dcfg.chat_template)
    kw = dict(fmt=dcfg.format, system_prompt=dcfg.system_prompt, max_seq_len=dcfg.max_seq_len,
              overlong=dcfg.overlong, chat_template=template, rewritten_turns=dcfg.rewritten_turns)
    train, train_rows, report = build_examples(dcfg.train, tokenizer, **kw)
    lines = [report.summary()]
    if dcfg.eval:
        held, held_rows, eval_report = build_examples(dcfg.eval, tokenizer, **kw)
        lines.append(eval_report.summary())
    else:
        kept, held_out_pairs, split_lines = held_out(list(zip(train, train_rows)), dcfg.eval_fraction, dcfg.split_seed,
                                                     "examples")
        train, held, held_rows = [e for e, _ in kept], [e for e, _ in held_out_pairs], [r for _, r in held_out_pairs]
        lines += split_lines
    return train, held, [(m, t) for _, m, t in held_rows], lines


def mix_in(cfg: SFTConfig, train: list[Example], model: torch.nn.Module, tokenizer: Any,
           out: Path) -> tuple[list[Example], list[str]]:
    """The training examples with ``data.mix`` and ``data.replay`` added at their shares; report lines.

    Replayed answers are generated once and kept in the run folder (replay.jsonl), so a resumed run trains on the
    same rows."""
    d = cfg.data
    if d.mix is None and d.replay is None:
        return train, []
    ratios = [d.mix.ratio if d.mix else 0.0, d.replay.ratio if d.replay else 0.0]
    mix_n, replay_n = mix_counts(len(train), ratios)
    kw = dict(fmt="auto", system_prompt=d.system_prompt, max_seq_len=d.max_seq_len, overlong=d.overlong,
              chat_template=resolve_template(d.chat_template), rewritten_turns=d.rewritten_turns)
    mixed, lines = list(train), []
    if d.mix:
        extra = sample_rows(build_examples(d.mix.path, tokenizer, **kw)[0], mix_n, d.mix.seed)
        mixed += extra
        lines.append(f"mixed in {len(extra)} examples of {d.mix.path} (asked {mix_n}, "
                     f"ratio {d.mix.ratio})")
    if d.replay:
        path = out / "replay.jsonl"
        key = json.dumps({"prompts": d.replay.prompts, "count": replay_n, "seed": d.replay.seed,
                          "max_new_tokens": d.replay.max_new_tokens, "model": cfg.model.name,
                          "init_adapter": cfg.model.init_adapter}, sort_keys=True)
        if not (path.exists() and (out / "replay.key").exists() and (out / "replay.key").read_text() == key):
            rows, empty = replay_rows(cfg, model, tokenizer, replay_n)
            if empty:
                lines.append(f"replay: {empty} empty base answers skipped")
            if not rows:
                raise ConfigError(f"data.replay: the base model gave no non-empty answer to {d.replay.prompts}")
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
            atomic_write_text(out / "replay.key", key)
        extra = build_examples(str(path), tokenizer, **kw)[0]
        mixed += extra
        lines.append(f"replayed {len(extra)} base-model answers to prompts of {d.replay.prompts} "
                     f"(asked {replay_n}, ratio {d.replay.ratio}; in {path})")
    share = 1 - len(train) / len(mixed)
    lines.append(f"training set: {len(train)} task + {len(mixed) - len(train)} mixed = {len(mixed)} examples "
                 f"({share:.1%} mixed)")
    return mixed, lines


def replay_rows(cfg: SFTConfig, model: torch.nn.Module, tokenizer: Any, count: int) -> tuple[list[dict[str, Any]], int]:
    """The starting model's greedy answers to ``count`` replay prompts (before any update), as chat rows, and how
    many answers were empty (nothing to train on; skipped and counted)."""
    r = cfg.data.replay
    chats = [chat for _, chat in load_prompt_chats(r.prompts, system_prompt=cfg.data.system_prompt)]
    chats = sample_rows(chats, count, r.seed)
    with model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext():
        answers = generate(model, tokenizer, chats, max_new_tokens=r.max_new_tokens,
                           chat_template=resolve_template(cfg.data.chat_template))
    rows = [{"messages": [*c, {"role": "assistant", "content": a}]} for c, a in zip(chats, answers) if a.strip()]
    return rows, len(chats) - len(rows)
