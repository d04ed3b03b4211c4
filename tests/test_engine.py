"""Schedule, accumulation invariance, resume-equals-uninterrupted, atomic checkpoints."""

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.config import load_config
from posttrain.data import collate
from posttrain.engine import warmup_cosine
from posttrain.engine.checkpoint import list_checkpoints
from posttrain.engine.loop import LoopOptions, train_loop
from posttrain.methods import SFT
from posttrain.recipes.sft import run as run_sft
from tests.helpers import chat_rows, random_examples, write_jsonl


def test_warmup_cosine_hand_values():
    kw = dict(total_steps=11, warmup_steps=2, min_ratio=0.1)
    assert warmup_cosine(0, **kw) == 0.5 and warmup_cosine(1, **kw) == 1.0  # linear warmup
    assert warmup_cosine(2, **kw) == pytest.approx(1.0)  # peak right after warmup
    # halfway through the decay (steps 2..10, progress 4/8): 0.1 + 0.9 * 0.5 * (1 + cos(pi/2)) = 0.55
    assert warmup_cosine(6, **kw) == pytest.approx(0.55)
    assert warmup_cosine(10, **kw) == pytest.approx(0.1)  # ends at 10% of peak


class FixedBatches:
    def __init__(self, micro):
        self.micro = micro

    def step(self, step):
        return self.micro


def one_step(tiny_dir, micro, tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64)
    opts = LoopOptions(total_steps=1, lr=1e-2, max_grad_norm=None)
    recs = train_loop(model, SFT(), FixedBatches(micro), opts, tmp_path)
    return recs[-1]["loss"], [p.detach().clone() for p in model.parameters()]


def test_four_micro_batches_with_accumulation_equal_one_batch_of_four(tiny_dir, tmp_path):
    exs = random_examples(4, 49152, seed=1)  # different lengths, so per-micro-batch means would differ
    loss_big, params_big = one_step(tiny_dir, [collate([[e] for e in exs], 0)], tmp_path / "a")
    loss_acc, params_acc = one_step(tiny_dir, [collate([[e]], 0) for e in exs], tmp_path / "b")
    assert loss_big == pytest.approx(loss_acc, abs=1e-9)
    for a, b in zip(params_big, params_acc):
        assert torch.allclose(a, b, atol=1e-9)


def sft_config(tiny_dir, data, out, *extra):
    return load_config(None, [f"model.name={tiny_dir}", f"data.train={data}", f"output_dir={out}",
                              "data.eval_fraction=0.1", "train.max_steps=6", "train.micro_batch_size=2",
                              "train.grad_accum=2", "train.lr=5e-3", "lora.dropout=0.1", "data.packing=false",
                              "eval_samples=0", *extra], method="sft")


def losses(out: Path):
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


def test_resume_equals_uninterrupted(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(40))
    full = tmp_path / "full"
    run_sft(sft_config(tiny_dir, data, full))

    part = tmp_path / "part"
    run_sft(sft_config(tiny_dir, data, part, "train.save_every=3"))
    # Simulate a crash after step 3: drop the final checkpoint, leave a half-written one behind.
    ckpts = list_checkpoints(part / "checkpoints")
    assert [c.name for c in ckpts] == ["step-0000003", "step-0000006"]
    import shutil

    shutil.rmtree(ckpts[-1])
    half = part / "checkpoints" / ".step-0000006.tmp-crash"
    half.mkdir()
    (half / "trainable.safetensors").write_bytes(b"partial")
    run_sft(sft_config(tiny_dir, data, part, "train.save_every=3"), resume=True)

    a, b = losses(full), losses(part)
    assert [s for s, _ in b] == [1, 2, 3, 4, 5, 6]  # the resumed log reads like one run
    for (sa, la), (sb, lb) in zip(a, b):
        assert sa == sb and la == pytest.approx(lb, abs=1e-6), (sa, la, lb)
    wa = (full / "adapter" / "adapter_model.safetensors").read_bytes()
    from safetensors.torch import load_file

    fa = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    fb = load_file(str(part / "adapter" / "adapter_model.safetensors"))
    assert wa and all(torch.allclose(fa[k], fb[k], atol=1e-6) for k in fa)


def test_resume_without_checkpoint_is_a_clear_error(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(10))
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        run_sft(sft_config(tiny_dir, data, tmp_path / "none"), resume=True)


def test_full_finetune_and_loss_goes_down(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(24))
    res = run_sft(sft_config(tiny_dir, data, tmp_path / "full", "finetune=full", "train.max_steps=8",
                             "train.lr=3e-3", "data.packing=true"))
    assert (tmp_path / "full" / "model" / "config.json").exists()
    assert res["eval_after"]["eval/loss"] < res["eval_before"]["eval/loss"]
    assert res["trainable"] == res["total_params"]
    assert not math.isnan(res["final_loss"])


def test_cpu_training_keeps_freed_memory_on_glibc():
    import platform

    from posttrain.engine.loop import keep_freed_cpu_memory

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert keep_freed_cpu_memory() is True
