"""The rollout-engine seam: the engines' per-token log-probs are the trainer's, and the managed vLLM server's
start-up failures name their cause (no vLLM needed: fake interpreters fail the way a real one does)."""

import stat
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.errors import ConfigError
from posttrain.rollout.engines import ENGINES, make_engine
from posttrain.rollout.interface import EngineSettings, HFEngine
from posttrain.rollout.vllm import ManagedVLLM, free_port, lora_rank, serve_command, server_env
from tests.helpers import engine_gap, lora_policy


def settings(**kw) -> EngineSettings:
    from posttrain.config import RolloutSection
    from posttrain.recipes._common import from_section

    return from_section(EngineSettings, RolloutSection(**kw))


@pytest.fixture(scope="module")
def policy(tiny_dir):
    return lora_policy(tiny_dir, seed=0, scale=0.3)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_hf_engine_logprobs_are_the_trainers(policy, tokenizer, temperature):
    """Recorded while decoding (merged LoRA, KV cache, min_new_tokens mask on) and recomputed by a teacher-forced
    forward (unmerged, no cache), the sampled tokens' log-probs agree: the hf engine has no mismatch but rounding."""
    prompts = [tokenizer("Name three colours.")["input_ids"], tokenizer("Count to five, slowly")["input_ids"]]
    engine = HFEngine(policy, tokenizer)
    ro = engine.sample(prompts, n=3, max_new_tokens=10, temperature=temperature, top_p=1.0, min_new_tokens=3,
                       seeds=[5, 6], batch_size=6)
    assert [len(lp) for lp in ro.logprobs] == [len(c) for c in ro.completion_ids]
    assert engine_gap(policy, tokenizer, ro, temperature, reduce="max") < 1e-4
    again = engine.sample(prompts, n=3, max_new_tokens=10, temperature=temperature, top_p=1.0, min_new_tokens=3,
                          seeds=[5, 6], batch_size=6)
    assert again.completion_ids == ro.completion_ids  # seeded: repeatable


def test_engine_table_and_unknown_name(policy, tokenizer, tmp_path):
    assert set(ENGINES) == {"hf", "server", "vllm"}
    assert isinstance(make_engine(policy, tokenizer, settings(), tmp_path, "unused"), HFEngine)
    with pytest.raises(ConfigError, match="rollout.server_url"):
        make_engine(policy, tokenizer, settings(engine="server"), tmp_path, "unused")


def test_server_engines_need_lora(tiny_dir, tokenizer, tmp_path):
    full = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with pytest.raises(ConfigError, match="needs finetune: lora"):
        make_engine(full, tokenizer, settings(engine="server", server_url="http://127.0.0.1:9/v1"), tmp_path, "x")
    with pytest.raises(ConfigError, match="needs finetune: lora"):
        make_engine(full, tokenizer, settings(engine="vllm", vllm_python=sys.executable), tmp_path, "x")


def test_vllm_without_vllm_or_an_interpreter_says_how_to_get_it(policy, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(ConfigError, match="make vllm-venv"):
        make_engine(policy, tokenizer, settings(engine="vllm"), tmp_path, "x")


def test_the_serve_command_asks_for_processed_logprobs_and_runtime_lora(policy):
    cmd = serve_command("/py", "/base", 8123, torch.float32, lora_rank(policy), ["--enforce-eager"])
    assert cmd[:3] == ["/py", "-m", "vllm.entrypoints.openai.api_server"]
    joined = " ".join(cmd)
    for part in ("--model /base", "--port 8123", "--dtype float32", "--enable-lora", "--max-lora-rank 8",
                 "--logprobs-mode processed_logprobs", "--served-model-name base"):
        assert part in joined
    assert cmd[-1] == "--enforce-eager" and "--gpu-memory-utilization" not in cmd
    # on a CPU the KV cache is a share of host RAM: a modest one unless the arguments size it
    assert "--gpu-memory-utilization 0.15" in " ".join(serve_command("/py", "/b", 1, torch.float32, 8, [], True))
    own = serve_command("/py", "/b", 1, torch.float32, 8, ["--kv-cache-memory-bytes", "1000000000"], True)
    assert "--gpu-memory-utilization" not in own
    env = server_env(on_cpu=True)
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True" and "VLLM_CPU_OMP_THREADS_BIND" in env


def fake_python(tmp_path, body: str) -> str:
    """An 'interpreter' that ignores its arguments and runs ``body`` (a shell script)."""
    path = tmp_path / "fake-python"
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@pytest.mark.parametrize("body, cause", [
    ("echo 'ModuleNotFoundError: No module named vllm' >&2; exit 1", "cannot import vllm"),
    ("echo 'OSError: [Errno 98] Address already in use'; exit 1", "port is already in use"),
    ("echo 'RuntimeError: CUDA out of memory. Tried to allocate'; exit 1", "ran out of memory"),
    ("echo \"RuntimeError: less than requested memory for kv (-0.88/0.75 GiB)\"; exit 1", "KV cache does not fit"),
    ("echo 'something else broke'; exit 3", "exited with code 3"),
])
def test_a_server_that_dies_while_starting_names_the_cause(policy, tokenizer, tiny_dir, tmp_path, body, cause):
    s = settings(engine="vllm", vllm_python=fake_python(tmp_path, body), start_timeout_s=30)
    with pytest.raises(ConfigError, match=cause) as info:
        ManagedVLLM.launch(policy, tokenizer, s, tmp_path / "run", tiny_dir)
    assert "vllm_server.log" in str(info.value)


def test_the_real_interpreter_without_vllm_is_named(policy, tokenizer, tiny_dir, tmp_path):
    s = settings(engine="vllm", vllm_python=sys.executable, start_timeout_s=60)
    with pytest.raises(ConfigError, match="cannot import vllm"):
        ManagedVLLM.launch(policy, tokenizer, s, tmp_path / "run", tiny_dir)


def test_a_server_that_never_answers_times_out_and_is_stopped(policy, tokenizer, tiny_dir, tmp_path):
    s = settings(engine="vllm", vllm_python=fake_python(tmp_path, "exec sleep 60"), start_timeout_s=1.5)
    with pytest.raises(ConfigError, match="did not answer within rollout.start_timeout_s=2 s"):
        ManagedVLLM.launch(policy, tokenizer, s, tmp_path / "run", tiny_dir)


def test_a_base_that_is_not_a_local_folder_is_refused_before_starting(policy, tokenizer, tmp_path):
    s = settings(engine="vllm", vllm_python=sys.executable)
    with pytest.raises(ConfigError, match="has no config.json"):
        ManagedVLLM.launch(policy, tokenizer, s, tmp_path / "run", str(tmp_path / "nowhere"))


def test_a_port_in_use_is_refused_before_anything_starts():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(ConfigError, match=f"rollout.port: {s.getsockname()[1]} is already in use"):
            free_port(s.getsockname()[1])
    assert free_port(0) > 0


def test_the_merged_base_a_managed_vllm_serves_is_the_policys_base(policy, tokenizer, tmp_path):
    """With model.init_adapter the policy's base is the merged model: written as a plain HF folder (no adapter
    layers, the weights' own names), it gives the adapter-off policy's logits."""
    from posttrain.recipes._prompts import write_base

    folder = write_base(policy, tokenizer, tmp_path / "rollout_base")
    plain = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor([tokenizer("Name three colours.")["input_ids"]])
    with torch.no_grad(), policy.disable_adapter():
        want = policy(input_ids=ids).logits
    assert not any("lora" in k for k in plain.state_dict())
    assert torch.allclose(plain(input_ids=ids).logits, want, atol=1e-5)
    assert write_base(policy, tokenizer, tmp_path / "rollout_base") == folder  # once per run
