"""Where a GRPO step's time goes: sampling, reference forward, policy forward+backward, for a few rollouts.

    .venv/bin/python benchmarks/profile_grpo_step.py [--steps 2] [overrides of examples/grpo-gsm8k.yaml ...]

Completions are forced to max_new_tokens (min_new_tokens = max) so steps are comparable. Needs ../shared/data.
"""

from __future__ import annotations

import argparse
import time

import torch

from posttrain.config import load_config
from posttrain.methods.grpo import GRPO, GRPOParams, grpo_schedule
from posttrain.models.reference import make_reference
from posttrain.recipes._common import begin_run, disable_dropout, from_section, prepare_model
from posttrain.recipes._prompts import read_prompts as load_prompts
from posttrain.recipes.grpo import combined


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config("examples/grpo-gsm8k.yaml", ["output_dir=/tmp/posttrain-profile", *args.overrides])
    loaded = begin_run(cfg).loaded
    g, t = cfg.grpo, cfg.train
    prompts, rows, chats, _ = load_prompts(cfg.data.train, cfg.data, loaded.tokenizer, 256)
    model, _ = prepare_model(cfg, loaded)
    disable_dropout(model, "GRPO")
    params = from_section(GRPOParams, g, min_new_tokens=g.max_new_tokens)
    reference = make_reference(model, lora=True, per_token=True, temperature=g.temperature,
                               chunk_size=t.loss_chunk_size)
    plan = grpo_schedule(model, loaded.tokenizer, prompts, rows, chats, combined(cfg.rewards, cfg.reward_reduce),
                         params, prompts_per_step=g.prompts_per_step, mu=1, micro_batch_size=t.micro_batch_size,
                         seed=t.seed, reference=None, share_prompt=cfg.data.share_prompt)
    method = GRPO(params, t.loss_chunk_size)
    for step in range(args.steps):
        t0 = time.perf_counter()
        batches = plan.step(step)
        t1 = time.perf_counter()
        with torch.no_grad():
            for b in batches:
                b["ref_logp"] = reference(model, b)
        t2 = time.perf_counter()
        for b in batches:
            loss, _ = method.loss_sum(model, b)
            loss.backward()
        t3 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        fed = sum(int(b["num_tokens"]) for b in batches)
        print(f"step {step}: sampling {t1 - t0:.1f} s | reference {t2 - t1:.1f} s | policy fwd+bwd {t3 - t2:.1f} s "
              f"| {fed} positions fed in {len(batches)} micro-batches", flush=True)


if __name__ == "__main__":
    main()
