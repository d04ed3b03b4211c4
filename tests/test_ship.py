"""QLoRA (4-bit base) training, merge into a standalone model, and adapter export, on a tiny model."""

import json

import pytest
import torch

from posttrain.cli import main
from posttrain.config import load_config
from posttrain.errors import ConfigError
from tests.helpers import chat_rows, write_jsonl

pytest.importorskip("bitsandbytes")


def _train(tmp, tiny_dir, name: str, *extra: str):
    data = write_jsonl(tmp / "train.jsonl", chat_rows(24))
    cfg = tmp / f"{name}.yaml"
    # A large lr so the adapter moves the logits far enough for a merge check to mean something.
    cfg.write_text(f"model: {{name: {tiny_dir}}}\ndata: {{train: {data}, eval_fraction: 0.0}}\n"
                   f"output_dir: {tmp / name}\ntrain: {{max_steps: 3, micro_batch_size: 4, lr: 0.02}}\n"
                   "eval_samples: 0\nlora: {r: 4, alpha: 8}\n")
    assert main(["sft", str(cfg), *extra]) == 0
    return tmp / name


@pytest.fixture(scope="module")
def lora_run(tiny_dir, tmp_path_factory):
    return _train(tmp_path_factory.mktemp("lora"), tiny_dir, "lora")


@pytest.fixture(scope="module")
def qlora_run(tiny_dir, tmp_path_factory):
    return _train(tmp_path_factory.mktemp("qlora"), tiny_dir, "qlora", "model.quantization=nf4")


def test_qlora_base_is_4bit_and_counted(qlora_run):
    summary = json.loads((qlora_run / "summary.json").read_text())
    b = summary["base_weight_bytes"]
    # 2 layers x (q 64x64 + k 64x32 + v 64x32 + o 64x64 + gate/up/down 3 x 64x128) = 2 x 36,864 weights.
    assert b["quantized_params"] == 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128) == 73_728
    # nf4 packs two weights per byte plus one 8-bit scale per block of 64 (double quantization); each of the 14
    # layers also carries fixed tables (16 + 256 fp32 code values, a few second-level scales): under 1.2 KB.
    q = b["quantized_params"]
    assert 0 < b["quantized"] - (q / 2 + q / 64) < 14 * 1200
    assert b["quantized_as_dense"] == 2 * q
    assert summary["total_params"] > summary["trainable"] > 0
    loss = [json.loads(x)["loss"] for x in (qlora_run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert loss[-1] < loss[0]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_merge_equals_w_plus_scaled_ba_and_base_plus_adapter(lora_run, tmp_path, tiny_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from posttrain.models import load_adapter
    from posttrain.ship import merge_run

    report = merge_run(str(lora_run), str(tmp_path / "merged"), max_new_tokens=8)
    for key in ("merged_vs_base_plus_adapter", "reloaded_vs_base_plus_adapter"):
        assert report[key]["max_abs_logit_diff"] < 1e-4, report[key]
        assert report[key]["greedy_identical"] == report[key]["prompts"] == 8

    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in k for k in merged.state_dict())
    # W' = W + (alpha / r) B A, by hand, for one projection: alpha 8, r 4 -> scale 2.
    f = load_file(str(lora_run / "adapter" / "adapter_model.safetensors"))
    a = f["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
    b = f["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    w = base.model.layers[1].self_attn.q_proj.weight
    assert torch.allclose(merged.model.layers[1].self_attn.q_proj.weight, w + 2.0 * b @ a, atol=1e-6)

    ids = torch.tensor([[1, 200, 300, 400, 500, 600]])
    with_adapter = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_dir), str(lora_run / "adapter")).eval()
    assert (_logits(base, ids) - _logits(merged, ids)).abs().max() > 1e-2  # the adapter does change the model
    assert torch.allclose(_logits(merged, ids), _logits(with_adapter, ids), atol=1e-4)


def test_qlora_merge_goes_into_the_dequantized_base(qlora_run, tmp_path, capsys):
    assert main(["merge", str(qlora_run), "--out", str(tmp_path / "m"), "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "de-quantized" in out or "merged vs base+adapter" in out
    report = json.loads((tmp_path / "m" / "merge_report.json").read_text())
    assert report["quantization"] == "nf4"
    good, naive = report["reloaded_vs_base_plus_adapter"], report["original_base_merged_vs_base_plus_adapter"]
    assert good["greedy_identical"] == good["prompts"]
    assert good["max_abs_logit_diff"] < 1e-3
    # Merging into the original full-precision base instead misses the quantization error the adapter saw.
    assert naive["max_abs_logit_diff"] > 10 * good["max_abs_logit_diff"]


def test_export_is_a_peft_folder_that_loads_back(lora_run, tmp_path, tiny_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from posttrain.models import load_adapter

    assert main(["export", str(lora_run), "--out", str(tmp_path / "x")]) == 0
    cfg = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == tiny_dir and cfg["r"] == 4
    report = json.loads((tmp_path / "x" / "export_report.json").read_text())
    assert report["max_abs_diff_after_reload"] == 0.0 and report["tensors"] == 2 * 7 * 2
    ids = torch.tensor([[1, 200, 300, 400]])
    exported = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), tmp_path / "x").eval()
    trained = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_dir), str(lora_run / "adapter")).eval()
    assert torch.equal(_logits(exported, ids), _logits(trained, ids))


def test_shipping_refusals(lora_run, tmp_path, capsys):
    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "notes.txt").write_text("do not delete")
    assert main(["merge", str(lora_run), "--out", str(keep)]) == 2
    assert "not an earlier merge or export output" in capsys.readouterr().err
    assert (keep / "notes.txt").exists()
    assert main(["export", str(lora_run), "--out", str(lora_run / "adapter")]) == 2


def test_serving_warnings_name_what_a_lora_server_cannot_apply():
    from posttrain.ship import serving_warnings

    assert serving_warnings({"target_modules": ["q_proj", "v_proj"], "bias": "none"}) == []
    warn = serving_warnings({"use_dora": True, "modules_to_save": ["score"], "target_modules": ["q_proj", "wte"]})
    assert len(warn) == 3 and "DoRA" in warn[0] and "score" in warn[1] and "wte" in warn[2]


def test_quantization_config_errors(tmp_path):
    base = {"data": {"train": "x.jsonl"}, "model": {"quantization": "nf4"}}
    with pytest.raises(ConfigError, match="needs finetune: lora"):
        load_config(None, [], method="sft", base={**base, "finetune": "full"})
    with pytest.raises(ConfigError, match="posttrain merge"):
        load_config(None, [], method="sft", base={**base, "model": {"quantization": "nf4", "init_adapter": "r"}})


def test_eight_bit_adamw_steps_on_cpu():
    from posttrain.engine.loop import OPTIMIZERS

    p = torch.nn.Parameter(torch.ones(4096))
    opt = OPTIMIZERS["adamw_8bit"]([p], lr=0.1, betas=(0.9, 0.999), weight_decay=0.0)
    p.grad = torch.ones(4096)
    opt.step()
    # Adam's first step moves every weight by lr against the gradient's sign, whatever the moments' precision.
    assert torch.allclose(p.detach(), torch.full((4096,), 0.9), atol=1e-3)


@pytest.mark.parametrize("method", ["dpo", "reward", "grpo"])
def test_every_training_command_takes_a_4bit_base(method, tiny_dir, tmp_path):
    from posttrain.recipes import RECIPES
    from tests.helpers import grpo_cfg, pair_rows

    quant = ["model.quantization=nf4", "train.max_steps=2"]
    if method == "grpo":
        cfg = grpo_cfg(tiny_dir, tmp_path, tmp_path / "run", *quant)
    else:
        path = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(12))
        cfg = load_config(None, [f"model.name={tiny_dir}", f"data.train={path}", f"output_dir={tmp_path / 'run'}",
                                 "data.eval_fraction=0.25", "train.lr=1e-3", *quant], method=method)
    summary = RECIPES[method].run(cfg)
    assert summary["steps"] == 2 and summary["base_weight_bytes"]["quantized_params"] == 73_728
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] == r["loss"] for r in records if "loss" in r)  # finite, not NaN
