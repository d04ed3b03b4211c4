"""torchrun with 2 CPU processes (gloo) gives the loss curve of one process with the same global batch: SFT, DPO and
reward (batches split by rank), GRPO and PPO (rollouts split by prompt group)."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from tests.helpers import chat_rows, pair_rows, write_jsonl


def _records(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _launch(nproc: int, method: str, cfg, out, *overrides: str) -> None:
    runner = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    cmd = [*runner, "-m", "posttrain", method, str(cfg), f"output_dir={out}", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _same_curve(one, two, keys, train_only: bool = False) -> None:
    a, b = _records(one), _records(two)
    if train_only:  # a shortened run also evaluates at its own last step
        a, b = ([r for r in recs if "loss" in r] for recs in (a, b))
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k in keys:
            if k in ra:
                assert rb[k] == pytest.approx(ra[k], abs=1e-4), (ra["step"], k, ra[k], rb[k])


@pytest.mark.parametrize("method,parallel", [("sft", "ddp"), ("dpo", "ddp"), ("sft", "fsdp"), ("reward", "fsdp")])
def test_two_processes_equal_one_with_the_same_global_batch(method, parallel, tiny_dir, tmp_path, monkeypatch):
    if method == "sft":
        data = write_jsonl(tmp_path / "train.jsonl", chat_rows(40))
        extra, keys = "eval_samples: 0\n", ["loss", "grad_norm", "loss_units", "eval/loss"]
    else:  # dpo and reward read the same pairs
        data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(24))
        extra, keys = "", ["loss", "grad_norm", "loss_units", "accuracy", "rewards/margin", "eval/loss",
                           "eval/accuracy"]
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"method: {method}\nmodel: {{name: {tiny_dir}}}\ndata: {{train: {data}, eval_fraction: 0.2}}\n"
                   "train: {max_steps: 3, micro_batch_size: 2, lr: 0.01, eval_every: 3, save_every: 2, "
                   f"min_lr_ratio: 1.0, distributed: {parallel}}}\nlora: {{r: 4}}\n{extra}")
    # One process accumulating 2 micro-batches == 2 processes with 1 each: the same 4 rows per step.
    tracked = (method, parallel) == ("sft", "ddp") and importlib.util.find_spec("mlflow") is not None
    _launch(1, method, cfg, tmp_path / "one", "train.grad_accum=2")
    _launch(2, method, cfg, tmp_path / "two", "train.grad_accum=1", *(["train.report_to=[mlflow]"] if tracked else []))
    _same_curve(tmp_path / "one", tmp_path / "two", keys)
    if tracked:  # rank 0 alone logs: one MLflow run, holding metrics.jsonl's losses
        from mlflow.tracking import MlflowClient

        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's file store, as the run chose it
        client = MlflowClient((tmp_path / "two" / "mlruns").as_uri())
        [run] = client.search_runs([client.get_experiment_by_name("posttrain").experiment_id])
        assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == \
            [(r["step"], r["loss"]) for r in _records(tmp_path / "two") if "loss" in r]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    if (method, parallel) != ("sft", "fsdp"):
        return
    # Resume a sharded 2-process run from its step-2 checkpoint: the same last step as uninterrupted.
    _launch(2, method, cfg, tmp_path / "part", "train.grad_accum=1", "train.max_steps=2")
    _launch(2, method, cfg, tmp_path / "part", "train.grad_accum=1", "--resume", "--extend-steps")
    _same_curve(tmp_path / "one", tmp_path / "part", keys, train_only=True)


@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_online_rl_on_two_processes_equals_one(method, tiny_dir, tmp_path):
    """Each process samples and scores its half of every rollout's prompt groups (each completion from its own
    generator, seeded by its prompt's place in the rollout), so two processes see exactly the completions one
    process sees; the loss count and the gradients are summed over them (and PPO whitens over the whole rollout)."""
    rows = [{"prompt": f"Say a number bigger than {i}.", "answer": f"#### {i + 1}"} for i in range(12)]
    data = write_jsonl(tmp_path / "q.jsonl", rows)
    common = (f"model: {{name: {tiny_dir}}}\ndata: {{train: {data}, eval_fraction: 0.2}}\nlora: {{r: 4}}\n"
              "train: {max_steps: 3, micro_batch_size: 2, lr: 0.01, eval_every: 3, min_lr_ratio: 1.0}\n")
    if method == "grpo":
        body = ("grpo: {group_size: 2, prompts_per_step: 4, max_new_tokens: 6, temperature: 1.0}\n"
                "rewards: [{name: regex, options: {pattern: '[0-9]'}}, {name: length_penalty, weight: 0.1}]\n")
        keys = ["loss", "grad_norm", "loss_units", "reward", "kl", "clip_fraction", "completion_len", "eval/reward"]
    else:
        from posttrain.config import load_config
        from posttrain.recipes.reward import run as run_reward

        pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(12))
        run_reward(load_config(None, [f"model.name={tiny_dir}", f"data.train={pairs}", "lora.r=4",
                                      f"output_dir={tmp_path / 'rm'}", "train.max_steps=2", "train.lr=5e-3"],
                               method="reward"))
        body = (f"ppo: {{reward_model: {tmp_path / 'rm'}, prompts_per_step: 4, samples_per_prompt: 2, "
                "max_new_tokens: 6, temperature: 1.0}\n")
        keys = ["loss", "grad_norm", "loss_units", "reward", "kl", "policy_loss", "value_loss", "return_mean",
                "eval/reward"]
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"method: {method}\n{common}{body}")
    _launch(1, method, cfg, tmp_path / "one")
    _launch(2, method, cfg, tmp_path / "two")
    _same_curve(tmp_path / "one", tmp_path / "two", keys)
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    steps = [r for r in _records(tmp_path / "two") if "loss" in r]
    assert steps and all(r["loss_units"] > 0 for r in steps)


def test_online_rl_refuses_sharded_weights(tmp_path, tiny_dir, monkeypatch):
    from posttrain.config import load_config
    from posttrain.errors import ConfigError
    from posttrain.recipes.grpo import run

    data = write_jsonl(tmp_path / "q.jsonl", [{"prompt": f"Say {i}."} for i in range(4)])
    cfg = load_config(None, [f"model.name={tiny_dir}", f"data.train={data}", "train.distributed=fsdp"],
                      method="grpo", base={"rewards": [{"name": "regex", "options": {"pattern": "1"}}]})
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; refused before any process group is joined
    with pytest.raises(ConfigError, match="train.distributed: fsdp is not supported by grpo"):
        run(cfg)
