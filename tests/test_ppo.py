"""PPO: four roles on one base (switching keeps both trainable adapters trainable), scores read where the reward
model reads them, GAE wiring, the actor's entropy metric, an end-to-end run against a reward model trained by
`posttrain reward`, resume."""

import json
import math

import pytest
import torch

from posttrain.config import load_config
from posttrain.engine.resume import Resume
from posttrain.errors import ConfigError
from posttrain.methods.ppo import ACTOR, CRITIC, PPO, REWARD, ppo_schedule
from posttrain.recipes._common import begin_run
from posttrain.recipes._prompts import load_prompt_splits
from posttrain.recipes.ppo import build_roles
from posttrain.recipes.ppo import run as run_ppo
from posttrain.recipes.reward import run as run_reward
from posttrain.rewards import load_reward
from tests.helpers import make_tiny, pair_rows, ppo_params, step_records, write_jsonl


@pytest.fixture(scope="module")
def reward_run(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rm")
    path = write_jsonl(tmp / "pairs.jsonl", pair_rows(16))
    cfg = load_config(None, [f"model.name={tiny_dir}", f"data.train={path}", f"output_dir={tmp / 'rm'}",
                             "train.max_steps=4", "train.lr=5e-3", "data.eval_fraction=0.25"], method="reward")
    run_reward(cfg)
    return str(tmp / "rm")


def ppo_cfg(tiny_dir, tmp_path, reward_run, out, *extra):
    rows = [{"prompt": f"Say something kind about the number {i}.", "answer": f"#### {i}"} for i in range(12)]
    path = write_jsonl(tmp_path / "prompts.jsonl", rows)
    return load_config(None, [f"model.name={tiny_dir}", f"data.train={path}", f"output_dir={out}",
                              "data.eval_fraction=0.2", f"ppo.reward_model={reward_run}", "ppo.prompts_per_step=3",
                              "ppo.samples_per_prompt=2", "ppo.max_new_tokens=6", "train.lr=1e-3",
                              "train.micro_batch_size=4", "train.max_steps=4", *extra], method="ppo",
                       base={"watch": [{"name": "regex", "options": {"pattern": "[0-9]"}}]})


def roles_and_plan(tiny_dir, tmp_path, reward_run, **params):
    cfg = ppo_cfg(tiny_dir, tmp_path, reward_run, tmp_path / "x")
    loaded = begin_run(cfg).loaded
    roles = build_roles(cfg, loaded)
    (prompts, rows, chats), _, _ = load_prompt_splits(cfg.data, loaded.tokenizer)
    plan = ppo_schedule(roles, loaded.tokenizer, prompts, rows, chats,
                        ppo_params(max_new_tokens=6, samples_per_prompt=2, **params),
                        prompts_per_step=3, mu=1, micro_batch_size=4, seed=0)
    return roles, plan, loaded


def test_roles_share_one_base_and_switching_keeps_both_adapters_trainable(tiny_dir, tmp_path, reward_run):
    roles, plan, _ = roles_and_plan(tiny_dir, tmp_path, reward_run)
    trainable = {n for n, p in roles.named_parameters() if p.requires_grad}
    assert any(f".{ACTOR}." in n for n in trainable) and any(f".{CRITIC}." in n for n in trainable)
    assert not any(f".{REWARD}." in n for n in trainable) and "value_head.weight" in trainable
    assert "score_head.weight" not in trainable and all("lora_" in n or "value_head" in n for n in trainable)
    batch = plan.step(0)[0]
    with roles.role(REWARD):
        pass
    roles.values(batch)
    assert {n for n, p in roles.named_parameters() if p.requires_grad} == trainable
    assert roles.policy.active_adapter == ACTOR
    # The critic starts as the reward model: same adapter weights, value head = score head.
    assert torch.equal(roles.value_head.weight, roles.score_head.weight)


def test_scores_are_the_reward_models_scores(tiny_dir, tmp_path, reward_run):
    from posttrain.data.collate import collate_rollouts
    from posttrain.data.pairs import render_response

    roles, plan, loaded = roles_and_plan(tiny_dir, tmp_path, reward_run)
    rm = load_reward(reward_run, dtype="float32")
    chats = [[{"role": "user", "content": f"Question {i}?"}] for i in range(3)]
    answers = ["Yes.", "A longer answer with more words.", "no"]
    prompts, completions = [], []
    for chat, text in zip(chats, answers):  # a sampled completion ends at <|im_end|>, as the trained responses do
        ex = render_response(loaded.tokenizer, chat, [{"role": "assistant", "content": text}], None)
        first, last = ex.trained.index(True), max(t for t, on in enumerate(ex.trained) if on)
        prompts.append(ex.input_ids[:first])
        completions.append(ex.input_ids[first:last + 1])
    with torch.no_grad():
        scores = roles.scores(collate_rollouts(prompts, completions, loaded.tokenizer.pad_token_id))
    assert torch.allclose(scores, torch.tensor(rm.score(chats, answers)), atol=1e-4)
    assert float(scores.std()) > 0


def test_gae_wiring_without_kl_and_whitening_returns_the_score_everywhere(tiny_dir, tmp_path, reward_run):
    roles, plan, _ = roles_and_plan(tiny_dir, tmp_path, reward_run, kl_coef=0.0, lam=1.0, gamma=1.0,
                                    whiten_advantages=False)
    for b in plan.step(0):
        mask = b["completion_mask"].float()
        scores = roles.scores(b).detach()
        assert torch.allclose(b["returns"], scores[:, None] * mask, atol=1e-5)
        assert torch.allclose(b["advantages"], (scores[:, None] - b["old_values"]) * mask, atol=1e-5)


def rollout_ids(batch) -> tuple[list[list[int]], list[list[int]]]:
    """Each completion's prompt and completion token ids, read back from a shared-prompt rollout batch."""
    width, prompts, completions = batch["input_ids"].shape[1], [], []
    for i in range(batch["completion_mask"].shape[0]):
        row = int(batch["last_index"][i]) // width
        prompts.append(batch["input_ids"][row][batch["branch"][row] == 0].tolist())
        completions.append(batch["score_target"][batch["score_seq"] == i].tolist())
    return prompts, completions


def test_entropy_is_the_actors_mean_entropy_over_completion_tokens(tiny_dir, tmp_path, reward_run):
    # Independent of the packed, shared-prompt batch and the chunked head: each completion re-read on its own
    # (prompt + completion, plain forward), a full softmax of logits / T at every position that predicts a
    # completion token, then one mean over all of the micro-batch's completion tokens (as GRPO reduces it).
    from posttrain.data.collate import collate_rollouts

    # A low temperature: the tiny model is near uniform, where an fp32 entropy over the vocabulary carries ~1e-5 of
    # rounding and every reduction agrees; at 0.1 tokens differ (a per-completion mean is ~0.5 off), rounding ~1e-6.
    temperature = 0.1
    roles, plan, loaded = roles_and_plan(tiny_dir, tmp_path, reward_run, temperature=temperature)
    batch = plan.step(0)[0]
    prompts, completions = rollout_ids(batch)
    assert all(prompts) and [len(c) for c in completions] == batch["completion_mask"].sum(1).tolist()
    # The same rollout cut to uneven lengths: a mean of per-completion means would then differ from the token mean.
    lengths = [len(completions[0]), 1, 3, 2][:len(completions)]
    cut = collate_rollouts(prompts, [c[:k] for c, k in zip(completions, lengths)], loaded.tokenizer.pad_token_id)
    for key in ("old_logp", "advantages"):
        cut[key] = batch[key][:, :max(lengths)] * cut["completion_mask"]
    method = PPO(ppo_params(max_new_tokens=6, samples_per_prompt=2, temperature=temperature))
    for b in (batch, cut):
        metrics = next(iter(method.loss_parts(roles, b)))[1]  # the actor part, with autograd on
        ents = []
        with torch.no_grad():
            for prompt, completion in zip(*rollout_ids(b)):
                logits = roles.policy(input_ids=torch.tensor([prompt + completion])).logits[0].double() / temperature
                logp = torch.log_softmax(logits[len(prompt) - 1:-1], -1)
                ents.append(-(logp.exp() * logp).sum(-1))
        want = float(torch.cat(ents).mean())
        assert math.isfinite(metrics["entropy"]) and 0 < metrics["entropy"] <= math.log(logits.shape[-1])
        assert metrics["entropy"] == pytest.approx(want, abs=1e-5)


def test_run_ppo_end_to_end_and_resume_equals_uninterrupted(tiny_dir, tmp_path, reward_run):
    full = tmp_path / "full"
    # A constant lr, so the partial run (max_steps=2) has the schedule of the full one.
    summary = run_ppo(ppo_cfg(tiny_dir, tmp_path, reward_run, full, "train.min_lr_ratio=1.0"))
    metrics = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    step = next(m for m in metrics if "loss" in m)
    assert {"reward", "kl", "policy_loss", "value_loss", "clip_fraction", "watch", "completion_len"} <= set(step)
    assert all(math.isfinite(m["entropy"]) and m["entropy"] > 0 for m in metrics if "loss" in m)
    assert "eval/reward" in metrics[0] and "eval/watch" in metrics[0]
    mem = summary["memory"]
    assert mem["four_copies_weights_mb"] > 3.5 * mem["base_weights_mb"] and mem["peak_rss_mb"] > 0
    assert (full / "adapter" / "adapter_model.safetensors").exists()
    assert (full / "critic" / "value_head.safetensors").exists()
    assert (full / "rewards.svg").read_text().count("<polyline") >= 3
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(str(full / "adapter")).r == 16  # the actor alone, a plain PEFT adapter

    part = tmp_path / "part"
    run_ppo(ppo_cfg(tiny_dir, tmp_path, reward_run, part, "train.max_steps=2", "train.min_lr_ratio=1.0"))
    # Lengthened on resume, which needs extend_steps (a constant lr re-laid stays the same constant).
    run_ppo(ppo_cfg(tiny_dir, tmp_path, reward_run, part, "train.max_steps=4", "train.min_lr_ratio=1.0"),
            resume=Resume(extend_steps=True))
    a, b = step_records(full), step_records(part)
    assert [s for s, *_ in a] == [s for s, *_ in b]
    for (_, la, ra, ga), (_, lb, rb, gb) in zip(a, b):
        assert la == pytest.approx(lb, abs=1e-6) and ra == pytest.approx(rb, abs=1e-6)
        assert ga == pytest.approx(gb, rel=1e-4)


def test_ppo_config_checks(tiny_dir, tmp_path, tokenizer, reward_run):
    with pytest.raises(ConfigError, match="finetune: lora"):
        ppo_cfg(tiny_dir, tmp_path, reward_run, tmp_path / "x", "finetune=full")
    other = make_tiny(tmp_path / "other", tokenizer, seed=1)
    cfg = ppo_cfg(other, tmp_path, reward_run, tmp_path / "y")
    loaded = begin_run(cfg).loaded
    with pytest.raises(ConfigError, match="share one base"):
        build_roles(cfg, loaded)


def test_prompts_from_a_preference_file_are_the_dialogue_before_the_answers(tmp_path, tokenizer):
    from posttrain.config import PromptDataConfig
    from posttrain.recipes._prompts import read_prompts as load_prompts

    rows = [{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a colour.\n\nAssistant: Blue.",
             "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a colour.\n\nAssistant: No."},
            {"prompt": "Plain prompt.", "chosen": "a", "rejected": "b"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    _, _, chats, _ = load_prompts(path, PromptDataConfig(train=path), tokenizer, None)
    assert chats[0] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                        {"role": "user", "content": "Name a colour."}]
    assert chats[1] == [{"role": "user", "content": "Plain prompt."}]
