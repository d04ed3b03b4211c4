"""`posttrain sft` end to end on the tiny model: resume equals an uninterrupted run (even with a torn checkpoint
left behind), a clear error without a checkpoint, full fine-tuning lowers the held-out loss."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.config import load_config
from posttrain.engine.checkpoint import list_checkpoints
from posttrain.recipes.sft import run as run_sft
from tests.helpers import chat_rows, write_jsonl


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
