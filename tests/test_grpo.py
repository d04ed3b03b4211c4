"""GRPO: sampling with merged LoRA, rollout batches, the policy-gradient direction, an end-to-end run, resume."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.config import load_config
from posttrain.engine.resume import Resume
from posttrain.errors import ConfigError
from posttrain.methods.grpo import GRPO, grpo_schedule
from posttrain.models import apply_lora
from posttrain.models.forward import token_logps
from posttrain.recipes.grpo import run as run_grpo
from posttrain.rollout.sample import merged_for_generation, sample_completions
from tests.helpers import grpo_cfg, grpo_params, step_records


def lora_model(tiny_dir):
    torch.manual_seed(0)
    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32), r=4, alpha=8,
                       dropout=0.0, target_modules="all-linear")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def prompt_ids(tokenizer, n=3):
    from posttrain.data.render import render_prompt

    return [tokenizer(render_prompt(tokenizer, [{"role": "user", "content": f"Count to {i}."}]),
                      add_special_tokens=False)["input_ids"] for i in range(n)]


def test_merged_generation_equals_unmerged_and_restores_weights_exactly(tiny_dir, tokenizer):
    model = lora_model(tiny_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([prompt_ids(tokenizer, 1)[0]])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with merged_for_generation(model):
            merged = model(input_ids=ids).logits
    assert torch.allclose(plain, merged, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # bit for bit


def test_sampling_is_seeded_and_stops_at_end_of_turn(tiny_dir, tokenizer):
    model = lora_model(tiny_dir)
    prompts = prompt_ids(tokenizer)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(sample_completions(model, tokenizer, prompts, n=2, max_new_tokens=12, temperature=1.0))
    a, b = runs
    assert a.completion_ids == b.completion_ids and len(a.texts) == 6
    assert a.prompt_ids[0] == a.prompt_ids[1] == prompts[0]
    for c, done in zip(a.completion_ids, a.finished):
        assert len(c) <= 12 and (done == (c[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")))


def length_reward(prompts, completions, **row):
    return [float(len(c)) for c in completions]


def test_rollout_plan_batches_and_policy_gradient_direction(tiny_dir, tokenizer):
    model = lora_model(tiny_dir)
    prompts = prompt_ids(tokenizer, 4)
    rows = [{"id": i} for i in range(4)]
    params = grpo_params(group_size=4, kl_coef=0.0, max_new_tokens=10)
    plan = grpo_schedule(model, tokenizer, prompts, rows, [[]] * 4, length_reward, params, prompts_per_step=2, mu=2,
                         micro_batch_size=3, seed=0, reference=None)
    batches = plan.step(0)
    assert plan.step(1) is batches  # mu=2: the same rollouts serve two optimizer steps
    # micro-batches of 3 completions; a row per prompt in each (its completions share one copy of it)
    assert [b["completion_mask"].shape[0] for b in batches] == [3, 3, 2]
    assert [b["input_ids"].shape[0] for b in batches] == [1, 2, 1]
    adv = torch.cat([b["advantages"] for b in batches])
    assert float(adv.reshape(2, 4).sum(1).abs().max()) < 1e-5  # group-relative: each group sums to zero
    assert "old_logp" in batches[0] and float(batches[0]["metrics"]["reward"]) >= 0
    # One step of the GRPO loss raises the log-prob of completions with positive advantage relative to the rest.
    method = GRPO(params)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    seq_logp = lambda: torch.cat([token_logps(model, b).sum(1) for b in batches])
    with torch.no_grad():
        start = seq_logp()
    for b in batches:
        loss, metrics = method.loss_sum(model, b)
        (loss / 8).backward()
    assert metrics["clip_fraction"] == 0.0  # old == current: ratio 1
    opt.step()
    with torch.no_grad():
        moved = seq_logp() - start
    pos, neg = adv > 0.5, adv < -0.5
    assert float(moved[pos].mean()) > float(moved[neg].mean())



def test_run_grpo_end_to_end_and_resume_equals_uninterrupted(tiny_dir, tmp_path):
    full = tmp_path / "full"
    # A constant lr, so the partial run (max_steps=2) has the schedule of the full one.
    summary = run_grpo(grpo_cfg(tiny_dir, tmp_path, full, "train.min_lr_ratio=1.0"))
    metrics = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    step = next(m for m in metrics if "loss" in m)
    assert {"reward", "reward_std", "kl", "clip_fraction", "completion_len", "reward/regex",
            "reward/gsm8k_answer"} <= set(step)
    assert metrics[0]["step"] == 0 and "eval/reward" in metrics[0] and summary["eval_after"]["step"] == 4
    assert (full / "adapter" / "adapter_model.safetensors").exists()
    assert "watch" in step and "eval/watch" in metrics[0]  # scored and logged, not trained on
    assert (full / "rewards.svg").read_text().count("<polyline") >= 3

    part = tmp_path / "part"
    run_grpo(grpo_cfg(tiny_dir, tmp_path, part, "train.max_steps=2", "train.min_lr_ratio=1.0"))
    # Lengthened on resume, which needs extend_steps (a constant lr re-laid stays the same constant).
    run_grpo(grpo_cfg(tiny_dir, tmp_path, part, "train.max_steps=4", "train.min_lr_ratio=1.0"),
             resume=Resume(extend_steps=True))
    a, b = step_records(full), step_records(part)
    assert [s for s, *_ in a] == [s for s, *_ in b]
    for (_, la, ra, ga), (_, lb, rb, gb) in zip(a, b):
        assert la == pytest.approx(lb, abs=1e-5) and ra == rb and ga == pytest.approx(gb, rel=1e-4)


def test_grpo_config_checks(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match="multiples"):
        grpo_cfg(tiny_dir, tmp_path, tmp_path / "x", "grpo.mu=2", "train.max_steps=3")
    with pytest.raises(ConfigError, match="rewards"):
        load_config(None, ["data.train=x.jsonl"], method="grpo")


def half_constant_reward(prompts, completions, id, **row):
    """Prompts with an odd id always score 1 (a group without signal); even ones score their length."""
    return [1.0 if i % 2 else float(len(c)) for c, i in zip(completions, id)]


def _dynamic_plan(tiny_dir, tokenizer, reward, **kw):
    model = lora_model(tiny_dir)
    prompts = prompt_ids(tokenizer, 6)
    params = grpo_params(group_size=2, kl_coef=0.0, max_new_tokens=6, dynamic_sampling="drop_equal", **kw)
    # 4 of the 6 prompts per rollout: every draw holds an odd one, which is dropped
    return grpo_schedule(model, tokenizer, prompts, [{"id": i} for i in range(6)], [[]] * 6, reward, params,
                         prompts_per_step=4, mu=1, micro_batch_size=4, seed=0, reference=None)


def test_dynamic_sampling_keeps_only_groups_with_signal(tiny_dir, tokenizer):
    plan = _dynamic_plan(tiny_dir, tokenizer, half_constant_reward, max_draws=8)
    batches = plan.step(0)
    m = batches[0]["metrics"]
    assert all(i % 2 == 0 for i in plan.last_rollout["prompts"]) and len(plan.last_rollout["prompts"]) == 4
    assert 0 < float(m["dynamic/dropped_share"]) < 1 and float(m["dynamic/fallback"]) == 0.0
    assert float(m["dynamic/draws"]) >= 2
    adv = torch.cat([b["advantages"] for b in batches]).reshape(4, 2)
    assert bool((adv.abs().sum(1) > 0).all())  # every kept group carries signal
    again = _dynamic_plan(tiny_dir, tokenizer, half_constant_reward, max_draws=8)
    again.step(0)
    assert again.last_rollout == plan.last_rollout  # the extra draws are seeded


def test_dynamic_sampling_falls_back_after_max_draws(tiny_dir, tokenizer):
    plan = _dynamic_plan(tiny_dir, tokenizer, lambda p, c, **row: [1.0] * len(c), max_draws=2)
    m = plan.step(0)[0]["metrics"]
    assert float(m["dynamic/draws"]) == 2.0 and float(m["dynamic/fallback"]) == 1.0
    assert float(m["dynamic/dropped_share"]) == 1.0 and len(plan.last_rollout["prompts"]) == 4


def test_masked_truncated_completions_carry_no_loss(tiny_dir, tokenizer):
    model = lora_model(tiny_dir)
    prompts = prompt_ids(tokenizer, 2)
    counts = {}
    for truncated in ("train", "mask"):
        # 2 new tokens from a random 49k vocabulary: every completion is cut at max_new_tokens
        params = grpo_params(group_size=2, kl_coef=0.0, max_new_tokens=2, truncated=truncated, aggregation="dapo")
        plan = grpo_schedule(model, tokenizer, prompts, [{"id": 0}, {"id": 1}], [[]] * 2, length_reward, params,
                             prompts_per_step=2, mu=1, micro_batch_size=4, seed=0, reference=None)
        (batch,) = plan.step(0)
        assert float(batch["metrics"]["truncated"]) == 1.0
        method = GRPO(params)
        loss, metrics = method.loss_sum(model, batch)
        counts[truncated] = (method.count(batch), float(loss.detach()), metrics["entropy"])
    assert counts["train"][0] == 8 and counts["mask"][:2] == (0, 0.0)  # dapo's unit: tokens that carry loss
    assert counts["mask"][2] == pytest.approx(counts["train"][2]) and counts["mask"][2] > 0  # still logged


def test_grpo_variant_config_checks(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match="grpo.std applies to advantage: grpo only"):
        grpo_cfg(tiny_dir, tmp_path, tmp_path / "x", "grpo.advantage=rloo", "grpo.std=population")
    with pytest.raises(ConfigError, match="async_ahead"):
        grpo_cfg(tiny_dir, tmp_path, tmp_path / "x", "grpo.dynamic_sampling=drop_equal", "rollout.engine=server",
                 "rollout.server_url=http://127.0.0.1:1/v1", "rollout.async_ahead=true")
    assert grpo_params(advantage="dr_grpo").aggregation_name == "dr_grpo"
    assert grpo_params(advantage="dr_grpo", aggregation="dapo").aggregation_name == "dapo"
    pg = grpo_params(clip_eps=0.2, clip_eps_high=0.28).policy_gradient()
    assert (pg.clip.low, pg.clip.high, pg.kl_estimator, pg.kl_ratio_corrected) == (0.2, 0.28, "k3", True)
