"""rollout.engine: server against posttrain serve in a thread: the whole client path a vLLM server takes (adapter
versions published and hot-loaded, token-id prompts, per-token logprobs), on CPU, in make test."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.errors import ConfigError
from posttrain.models import load_tokenizer
from posttrain.rollout.client import PUBLISH_DIR, ServerEngine, check_base
from posttrain.serve import Engine, Server
from tests.helpers import engine_gap, grpo_cfg, lora_policy, make_tiny


def start_server(model_dir: str, adapter_dir, mode: str = "processed_logprobs") -> Server:
    engine = Engine(AutoModelForCausalLM.from_pretrained(model_dir), load_tokenizer(model_dir), base_path=model_dir,
                    logprobs_mode=mode)
    return Server(engine, adapter_dir, port=0, batch_wait_s=0.01, timeout_s=120).start()


def engine_settings(url: str):
    from posttrain.config import RolloutSection
    from posttrain.recipes._common import from_section
    from posttrain.rollout.interface import EngineSettings

    return from_section(EngineSettings, RolloutSection(engine="server", server_url=url))


def test_sync_publishes_the_adapter_and_the_server_samples_from_it(tiny_dir, tokenizer, tmp_path):
    srv = start_server(tiny_dir, tmp_path)
    try:
        policy = lora_policy(tiny_dir, seed=3, scale=0.5)
        engine = ServerEngine.connect(policy, tokenizer, engine_settings(srv.url), tmp_path / "run")
        prompts = [tokenizer("Name three colours.")["input_ids"], tokenizer("Count to five")["input_ids"]]
        engine.sync(policy, 0)
        assert [a for a in srv.engine.adapters] == [engine.current[0]]
        ro = engine.sample(prompts, n=3, max_new_tokens=8, temperature=0.7, top_p=1.0, min_new_tokens=2,
                           seeds=[11, 12], batch_size=6)
        assert len(ro.completion_ids) == 6 and all(len(c) >= 2 for c in ro.completion_ids)
        assert engine_gap(policy, tokenizer, ro, 0.7) < 1e-4  # the server's numbers are the trainer's
        with policy.disable_adapter():
            assert engine_gap(policy, tokenizer, ro, 0.7) > 1e-2  # and not the base's: the adapter is in use
        again = engine.sample(prompts, n=3, max_new_tokens=8, temperature=0.7, top_p=1.0, min_new_tokens=2,
                              seeds=[11, 12], batch_size=6)
        assert again.completion_ids == ro.completion_ids  # seeded
        assert len({tuple(c) for c in ro.completion_ids}) > 1  # the n choices and the prompts draw apart
        # A new version replaces the old one on the server and on disk
        first = engine.current
        engine.sync(policy, 1)
        assert list(srv.engine.adapters) == [engine.current[0]] and not first[1].exists()
        assert engine.sync_s > 0
        engine.close()
        assert not srv.engine.adapters and not (tmp_path / "run" / PUBLISH_DIR).exists()
    finally:
        srv.stop()


def test_a_server_with_another_base_is_refused(tiny_dir, tokenizer, tmp_path):
    other = make_tiny(tmp_path / "other", tokenizer, seed=7)
    model = AutoModelForCausalLM.from_pretrained(other)
    with torch.no_grad():  # a base that differs the way two real checkpoints do, not two near-uniform random ones
        model.get_input_embeddings().weight.mul_(30)
    model.save_pretrained(other)
    srv = start_server(other, tmp_path)
    try:
        policy = lora_policy(tiny_dir, seed=3, scale=0.5)
        engine = ServerEngine.connect(policy, tokenizer, engine_settings(srv.url), tmp_path / "run")
        prompt = tokenizer("Name three colours.")["input_ids"]
        with pytest.raises(ConfigError, match="disagrees with the trainer"):
            check_base(engine, policy, tokenizer, prompt, 1.0)
        engine.close()
        with pytest.raises(ConfigError, match="rollout.served_model: 'nope' is not served"):
            settings = engine_settings(srv.url)
            settings.served_model = "nope"
            ServerEngine.connect(policy, tokenizer, settings, tmp_path / "run")
    finally:
        srv.stop()


def test_an_unreachable_server_is_named():
    from posttrain.rollout.client import ServerError

    engine = ServerEngine(None, "http://127.0.0.1:9/v1", "base", "/tmp/unused")
    with pytest.raises(ServerError, match="http://127.0.0.1:9/v1/models: cannot reach the rollout server"):
        engine.check_served()


def test_grpo_with_the_server_engine_trains_and_logs_the_mismatch(tiny_dir, tmp_path):
    """posttrain grpo rollout.engine=server: every rollout from the server with the current adapter; mismatch ~0
    (the same model and kernels), the sync timed, the importance weights ~1, nothing left on the server or disk."""
    from posttrain.recipes.grpo import run

    srv = start_server(tiny_dir, tmp_path)
    out = tmp_path / "run"
    try:
        cfg = grpo_cfg(tiny_dir, tmp_path, out, "rollout.engine=server", f"rollout.server_url={srv.url}",
                       "grpo.temperature=0.8", "rollout.is_correction=token", "train.log_every=1")
        run(cfg)
    finally:
        srv.stop()
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(steps) == 4
    for r in steps:
        assert r["mismatch/abs_mean"] < 1e-4 and r["mismatch/abs_max"] < 1e-3
        assert r["mismatch/is_weight"] == pytest.approx(1.0, abs=1e-3) and r["mismatch/is_capped"] == 0.0
        assert r["rollout/sample_s"] > 0
    # version 0 was published by the start-up probe; every later rollout publishes the updated adapter
    assert steps[0]["rollout/sync_s"] == 0.0 and all(r["rollout/sync_s"] > 0 for r in steps[1:])
    assert not srv.engine.adapters and not (out / PUBLISH_DIR).exists()
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert "train-inference mismatch" in (out / "report.html").read_text()


def test_the_managed_server_lifecycle_with_posttrain_serve_standing_in_for_vllm(tiny_dir, tokenizer, tmp_path):
    """ManagedVLLM's own work (start, wait for it, sync, sample, restart once when it dies, stop) against an
    'interpreter' that runs posttrain serve on the port and model vllm serve would get: the real vLLM runs the same
    client code in `make test-vllm`."""
    import os
    import signal
    import stat
    import sys

    from posttrain.rollout.client import ServerError
    from posttrain.rollout.vllm import ManagedVLLM

    fake = tmp_path / "vllm-python"
    fake.write_text(f"""#!/bin/sh
while [ $# -gt 0 ]; do case "$1" in --port) port=$2; shift;; --model) model=$2; shift;; esac; shift; done
exec {sys.executable} -m posttrain serve --model "$model" --adapter-dir / --port "$port" \\
    --logprobs-mode processed_logprobs
""")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    settings = engine_settings("unused")
    settings.engine, settings.vllm_python, settings.start_timeout_s = "vllm", str(fake), 120
    policy = lora_policy(tiny_dir, seed=3, scale=0.5)
    engine = ManagedVLLM.launch(policy, tokenizer, settings, tmp_path / "run", tiny_dir)
    prompts = [tokenizer("Name three colours.")["input_ids"]]
    try:
        engine.sync(policy, 0)
        ro = engine.sample(prompts, n=2, max_new_tokens=6, temperature=1.0, top_p=1.0, min_new_tokens=0, seeds=[1],
                           batch_size=2)
        assert engine_gap(policy, tokenizer, ro, 1.0) < 1e-4
        os.killpg(engine.proc.pid, signal.SIGKILL)  # the server dies mid-run
        engine.proc.wait(10)
        again = engine.sample(prompts, n=2, max_new_tokens=6, temperature=1.0, top_p=1.0, min_new_tokens=0,
                              seeds=[1], batch_size=2)
        assert engine.restarts == 1 and again.completion_ids == ro.completion_ids  # restarted, adapter reloaded
        os.killpg(engine.proc.pid, signal.SIGKILL)
        engine.proc.wait(10)
        with pytest.raises(ServerError, match="cannot reach the rollout server"):  # only once
            engine.sample(prompts, n=2, max_new_tokens=6, temperature=1.0, top_p=1.0, min_new_tokens=0, seeds=[1],
                          batch_size=2)
    finally:
        engine.close()
    assert engine.proc.poll() is not None  # stopped at the end


def test_async_ahead_samples_one_update_old_and_the_correction_sees_it(tiny_dir, tmp_path):
    """rollout.async_ahead: rollout k + 1 is sampled from the policy of rollout k while k trains, so from the second
    rollout on the samples are one update old (rollout/lag 1) and the engine's log-probs differ from the trainer's
    by that update, which the importance weights then correct; the hf engine cannot run ahead."""
    from posttrain.recipes.grpo import run

    with pytest.raises(ConfigError, match="async_ahead needs an engine of its own"):
        run(grpo_cfg(tiny_dir, tmp_path, tmp_path / "hf", "rollout.async_ahead=true"))
    srv = start_server(tiny_dir, tmp_path)
    out = tmp_path / "run"
    try:
        cfg = grpo_cfg(tiny_dir, tmp_path, out, "rollout.engine=server", f"rollout.server_url={srv.url}",
                       "rollout.async_ahead=true", "rollout.is_correction=token", "train.lr=0.05", "train.log_every=1")
        # a reward that differs within groups of the tiny model's random text, so every step updates the policy
        cfg.rewards = [type(cfg.rewards[0])(name="regex", options={"pattern": "[aeiou]{2}"})]
        run(cfg)
    finally:
        srv.stop()
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["rollout/lag"] for r in steps] == [0.0, 1.0, 1.0, 1.0]
    assert all(r["grad_norm"] > 0 for r in steps)
    assert steps[0]["mismatch/abs_mean"] < 1e-4  # sampled from the policy it trains
    assert all(r["mismatch/abs_mean"] > 1e-3 for r in steps[1:])  # one update stale: the lag is measured
    assert not srv.engine.adapters and not (out / PUBLISH_DIR).exists()
