import json
import os
from pathlib import Path

import pytest
import torch

from posttrain.models import load_tokenizer, resolve_model_path
from posttrain.models.numerics import FLAGS_ENV

# model.dtype=auto means fp32 in every test, on CPUs with and without native bf16 alike (subprocesses inherit it);
# tests/test_numerics.py forces each branch of the rule itself.
os.environ[FLAGS_ENV] = ""


@pytest.fixture(scope="session")
def embedded_dir() -> str:
    """The embedded SmolLM2 converted to safetensors (cached once per machine)."""
    return resolve_model_path(None)


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    return load_tokenizer(embedded_dir)


def make_tiny(path: Path, tokenizer, *, layers: int = 2, hidden: int = 64, seed: int = 0) -> str:
    """A tiny random Llama with the real SmolLM2 tokenizer, saved as an HF folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, tie_word_embeddings=True,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer) -> str:
    return make_tiny(tmp_path_factory.mktemp("tiny"), tokenizer)


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def chat_rows(n: int, seed: int = 0):
    import random

    rnd = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta"]
    rows = []
    for i in range(n):
        a, b = rnd.choice(words), rnd.choice(words)
        rows.append({"messages": [{"role": "user", "content": f"Combine {a} and {b} (#{i})."},
                                  {"role": "assistant", "content": f"{a}-{b}" + " ok" * rnd.randint(0, 6)}]})
    return rows


def step_records(run_dir: Path, keys=("step", "loss", "reward", "grad_norm")) -> list[tuple]:
    """The given fields of every optimizer-step record of a run's metrics.jsonl (resume-equals-uninterrupted)."""
    rows = map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())
    return [tuple(m[k] for k in keys) for m in rows if "loss" in m]
