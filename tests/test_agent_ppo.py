"""Multi-turn PPO in an environment: per-token advantages along the sampled tokens only (checked against a GAE
written out here), environment tokens out of every target, the terminal reward where a trajectory ends, the config's
refusals, and an end-to-end run in the tool environment without a reward model, resumed equal to uninterrupted."""

import json
import math

import pytest
import torch

from posttrain.config import load_config
from posttrain.engine.resume import Resume
from posttrain.errors import ConfigError
from posttrain.methods.agent import AgentSetup, samples
from posttrain.methods.agent_ppo import AgentPPOBatches, terminal_scores
from posttrain.methods.ppo import PPO, attach_roles
from posttrain.recipes.ppo import run as run_ppo
from posttrain.rollout.multiturn import Segment, Trajectory, encode
from posttrain.rollout.schedule import RolloutSchedule
from tests.helpers import lora_policy, make_tiny, ppo_params, step_records, write_jsonl
from tests.test_trajectory import Chatter, Scripted


def reference_gae(r: list[float], v: list[float], gamma: float, lam: float) -> list[float]:
    """Schulman et al. 2016 eq. 16 over one chain of actions, V after the last = 0, as plainly as it can be said."""
    adv, next_adv, next_v = [0.0] * len(r), 0.0, 0.0
    for t in reversed(range(len(r))):
        adv[t] = r[t] + gamma * next_v - v[t] + gamma * lam * next_adv
        next_adv, next_v = adv[t], v[t]
    return adv


def test_terminal_scores_sit_on_each_trajectorys_last_row():
    done = Trajectory(0, [], [Segment([], ""), Segment([], "")], reward=1.0)
    cut = Trajectory(1, [], [Segment([], "")], reward=0.0, finished=False)
    assert terminal_scores([done, cut], [0, 0, 1], penalty=0.5).tolist() == [0.0, 1.0, -0.5]


def test_multi_turn_ppo_advantages_follow_the_sampled_tokens(tiny_dir, tokenizer):
    roles = attach_roles(lora_policy(tiny_dir, seed=0, scale=0.05), None, None, critic_from_reward=False)
    assert roles.score_head is None and "reward" not in roles.policy.peft_config
    with torch.no_grad():  # a critic that is not all zeros, so the values' bootstrapping across turns shows
        roles.value_head.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
    gamma, lam, kl_coef = 0.9, 0.8, 0.1
    params = ppo_params(samples_per_prompt=2, max_new_tokens=6, kl_coef=kl_coef, gamma=gamma, lam=lam,
                        whiten_advantages=False)
    seen = []
    make = AgentPPOBatches(roles, AgentSetup(lambda: Chatter(3), None, None, 512), params,
                           record=lambda trajs, k: seen.append(trajs))
    rows = [{"prompt": f"Question {i}"} for i in range(4)]
    engine = Scripted(tokenizer, ["Hi there<|im_end|>", "Sure<|im_end|>", "Done<|im_end|>"])
    schedule = RolloutSchedule(roles.policy, tokenizer, [encode(tokenizer, r["prompt"]) for r in rows], rows,
                               [[]] * 4, make_batches=make, prompts_per_step=2, mu=1, micro_batch_size=3, seed=0,
                               engine=engine)
    batches = schedule.step(0)
    (trajs,) = seen
    _, owner, sampled = samples(trajs)
    assert len(trajs) == 4 and all(t.turns == 3 and t.reward == 1.0 for t in trajs) and owner == [0, 1, 2, 3]
    rows_out = [(b, i) for b in batches for i in range(b["completion_mask"].shape[0])]
    for k, (b, i) in enumerate(rows_out):
        flags = torch.tensor(sampled[k] + [False] * (b["completion_mask"].shape[1] - len(sampled[k])))
        assert b["completion_mask"][i].tolist() == flags.tolist()
        assert (b["advantages"][i][~flags] == 0).all() and (b["returns"][i][~flags] == 0).all()
        old, v = b["old_logp"][i][flags], b["old_values"][i][flags]
        ref = roles.ref_logps(b, params.temperature)[i][flags].float()
        r = (-kl_coef * (old - ref)).tolist()
        r[-1] += 1.0  # the environment's reward, on the trajectory's last sampled token
        want = reference_gae(r, v.tolist(), gamma, lam)
        assert b["advantages"][i][flags].tolist() == pytest.approx(want, abs=1e-4)
        assert b["returns"][i][flags].tolist() == pytest.approx((torch.tensor(want) + v).tolist(), abs=1e-4)
        env_at = torch.nonzero(~flags[:len(sampled[k])]).squeeze(-1)
        assert len(env_at) > 0 and env_at[0] > 0  # environment tokens sit between the turns
    loss, metrics = PPO(params).loss_sum(roles, batches[0])
    assert torch.isfinite(loss) and {"agent/turns", "agent/splits", "value_loss", "reward"} <= set(metrics)
    assert metrics["agent/turns"] == 3.0 and metrics["reward"] == 1.0


def env_cfg(tiny_dir, tmp_path, out, *extra, method="ppo"):
    rows = [{"prompt": f"What is {i} + {i + 2}?", "answer": str(2 * i + 2)} for i in range(10)]
    path = write_jsonl(tmp_path / "q.jsonl", rows)
    n = "ppo.samples_per_prompt" if method == "ppo" else "grpo.group_size"
    return load_config(None, [f"model.name={tiny_dir}", f"data.train={path}", f"output_dir={out}",
                              "data.eval_fraction=0.2", f"{method}.prompts_per_step=2", f"{n}=2",
                              f"{method}.max_new_tokens=6", "train.lr=1e-3", "train.micro_batch_size=4",
                              "train.max_steps=3", "train.min_lr_ratio=1.0", *extra], method=method,
                       base={"env": {"name": "tools", "options": {"tools": [], "verifier": "number"}}})


def test_run_multi_turn_ppo_without_a_reward_model(tiny_dir, tmp_path):
    full = tmp_path / "full"
    summary = run_ppo(env_cfg(tiny_dir, tmp_path, full))
    metrics = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    step = next(m for m in metrics if "loss" in m)
    assert {"reward", "kl", "policy_loss", "value_loss", "agent/turns", "agent/cut", "entropy"} <= set(step)
    assert "eval/reward" in metrics[0] and "eval/turns" in metrics[0]
    assert "adapter_reward_mb" not in summary["memory"] and (full / "critic" / "value_head.safetensors").exists()
    written = sorted((full / "trajectories").glob("rollout-*.jsonl"))
    assert len(written) == 3 and len(written[0].read_text().splitlines()) == 4


@pytest.mark.parametrize("method", ["ppo", "grpo"])
def test_multi_turn_resume_equals_uninterrupted(tiny_dir, tmp_path, method):
    from posttrain.recipes import RECIPES

    run = RECIPES[method].run
    full, part = tmp_path / "full", tmp_path / "part"
    run(env_cfg(tiny_dir, tmp_path, full, method=method))
    run(env_cfg(tiny_dir, tmp_path, part, "train.max_steps=2", method=method))
    run(env_cfg(tiny_dir, tmp_path, part, method=method), resume=Resume(extend_steps=True))
    a, b = step_records(full), step_records(part)
    assert [s for s, *_ in a] == [s for s, *_ in b] == [1, 2, 3]
    for (_, la, ra, ga), (_, lb, rb, gb) in zip(a, b):
        assert la == pytest.approx(lb, abs=1e-6) and ra == pytest.approx(rb, abs=1e-6)
        assert ga == pytest.approx(gb, rel=1e-4)
    assert (full / "trajectories" / "rollout-000002.jsonl").read_text() == \
        (part / "trajectories" / "rollout-000002.jsonl").read_text()


@pytest.mark.parametrize("extra, message", [
    (["ppo.reward_model=runs/rm"], "ppo.reward_model is not supported with an env"),
    (["ppo.step_rewards=runs/prm"], "ppo.step_rewards is not supported with an env"),
    (["ppo.critic_init=reward"], "ppo.critic_init: reward is not supported with an env"),
    (["rollout.async_ahead=true"], "rollout.async_ahead is not supported with an env"),
])
def test_an_env_refuses_what_multi_turn_ppo_cannot_do(tiny_dir, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        env_cfg(tiny_dir, tmp_path, tmp_path / "x", *extra)


def test_ppo_needs_a_reward_model_or_an_env(tiny_dir, tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "hi"}])
    with pytest.raises(ConfigError, match="ppo.reward_model: a `posttrain reward` run folder is needed"):
        load_config(None, [f"model.name={tiny_dir}", f"data.train={path}"], method="ppo")
    cfg = env_cfg(tiny_dir, tmp_path, tmp_path / "y", "ppo.critic_init=fresh")
    assert cfg.env.name == "tools" and cfg.ppo.reward_model is None


@pytest.fixture(scope="module")
def ending_dir(tmp_path_factory, tokenizer):
    """A tiny model that ends a turn with probability ~0.6 per token at temperature 0.8, so turns finish."""
    return make_tiny(tmp_path_factory.mktemp("ending"), tokenizer, end_logit=math.log(len(tokenizer) * 1.5) * 0.8)


@pytest.mark.parametrize("method", ["ppo", "grpo"])
def test_multi_turn_rl_with_the_server_engine(ending_dir, tmp_path, method):
    """Three-turn trajectories (a user environment by dotted path) sampled by the server engine, posttrain serve
    standing in for vLLM: the engine's log-probs of every sampled token, over all turns, match the trainer's."""
    from posttrain.recipes import RECIPES
    from tests.test_rollout_server import start_server

    tiny_dir = ending_dir
    rows = [{"prompt": f"Tell me about {i}."} for i in range(8)]
    path = write_jsonl(tmp_path / "q.jsonl", rows)
    srv = start_server(tiny_dir, tmp_path)
    out = tmp_path / "run"
    section = "ppo.samples_per_prompt" if method == "ppo" else "grpo.group_size"
    try:
        cfg = load_config(None, [f"model.name={tiny_dir}", f"data.train={path}", f"output_dir={out}",
                                 f"{method}.prompts_per_step=2", f"{section}=2", f"{method}.max_new_tokens=5",
                                 f"{method}.temperature=0.8", "train.micro_batch_size=4", "train.max_steps=2",
                                 "rollout.engine=server", f"rollout.server_url={srv.url}", "train.log_every=1"],
                          method=method, base={"env": {"name": "tests.test_trajectory:Chatter",
                                                       "options": {"turns": 3}}})
        RECIPES[method].run(cfg)
    finally:
        srv.stop()
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(steps) == 2 and all(r["agent/turns"] > 2.0 for r in steps)  # most trajectories finish all three
    assert all(r["mismatch/abs_mean"] < 1e-4 and r["mismatch/abs_max"] < 1e-3 for r in steps)
    trajs = [json.loads(x) for x in (out / "trajectories" / "rollout-000001.jsonl").read_text().splitlines()]
    assert any(t["turns"] == 3 and t["finished"] and not all(t["segments"][0]["sampled"]) for t in trajs)
