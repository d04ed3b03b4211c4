"""Preference pairs as the two pair recipes (dpo, reward) read and batch them: train/held-out pairs, the fixed
batches of evaluation and reference precomputation, and the training schedule. Layer 7, like the recipes."""

from __future__ import annotations

from typing import Any

from posttrain.config import DPOConfig, PreferenceDataConfig, RewardConfig
from posttrain.data import Pair, build_pairs, held_out, pair_batches, pair_schedule
from posttrain.data.schedule import StepSchedule
from posttrain.data.templates import resolve_template
from posttrain.engine.distributed import world


def prepare_pairs(dcfg: PreferenceDataConfig, tokenizer: Any) -> tuple[list[Pair], list[Pair], list[str]]:
    """Train and held-out preference pairs (each list indexed from 0 for reference tables) and report lines."""
    template = resolve_template(dcfg.chat_template)
    kw = dict(max_seq_len=dcfg.max_seq_len, overlong=dcfg.overlong, bad_pairs=dcfg.bad_pairs,
              system_prompt=dcfg.system_prompt, chat_template=template, limit=dcfg.limit)
    train, report = build_pairs(dcfg.train, tokenizer, **kw)
    lines = [report.summary()]
    if dcfg.eval:
        held, eval_report = build_pairs(dcfg.eval, tokenizer, **kw)
        lines.append(eval_report.summary())
    else:
        train, held, split_lines = held_out(train, dcfg.eval_fraction, dcfg.split_seed, "pairs")
        lines += split_lines
    for pairs in (train, held):
        for i, p in enumerate(pairs):
            p.index = i
    return train, held, lines


def fixed_pair_batches(cfg: DPOConfig | RewardConfig, pairs: list[Pair], pad_id: int) -> list[dict[str, Any]]:
    """Evaluation and reference-precomputation batches, laid out as the job's training batches are."""
    return pair_batches(pairs, cfg.train.micro_batch_size, pad_id, cfg.data.share_prompt,
                        cfg.data.max_seq_len if cfg.data.packing else None)


def pair_training_schedule(cfg: DPOConfig | RewardConfig, train: list[Pair], pad_id: int) -> tuple[StepSchedule, int]:
    """The training batches of a preference job and its number of optimizer steps."""
    t = cfg.train
    w = world()
    schedule = pair_schedule(train, micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum, seed=t.seed,
                             pad_id=pad_id, packing=cfg.data.packing, max_seq_len=cfg.data.max_seq_len,
                             share_prompt=cfg.data.share_prompt, world_size=w.size, rank=w.rank)
    return schedule, t.max_steps or schedule.steps_for(t.epochs)
