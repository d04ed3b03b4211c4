"""model.dtype: the rule that picks numerics from the CPU's features and a probe, each branch forced, and the
bf16_mixed path (fp32 weights and optimizer state, matmuls under bf16 autocast) run end to end on a tiny model."""

import json

import pytest
import torch

from posttrain.cli import main
from posttrain.models import numerics
from posttrain.models.numerics import choose_numerics, cpu_flags
from tests.helpers import chat_rows, write_jsonl

CPU = torch.device("cpu")


def _never():
    raise AssertionError("the probe must not run on a CPU without bf16 flags")


@pytest.mark.parametrize("flags, speedup, name", [
    (set(), None, "float32"),                      # no native bf16: not even probed (~170x slower there)
    ({"avx2", "avx512f"}, None, "float32"),        # AVX512 without its BF16 extension
    ({"avx512_bf16"}, 2.5, "bf16_mixed"),
    ({"amx_bf16"}, 1.6, "bf16_mixed"),
    ({"avx512_bf16"}, 1.2, "float32"),             # flag present, but the probe shows no gain (a VM, say)
])
def test_auto_on_cpu_follows_flags_and_probe(flags, speedup, name):
    n = choose_numerics("auto", CPU, flags=flags, probe=_never if speedup is None else (lambda: speedup))
    assert n.name == name
    assert n.weights == torch.float32  # master weights stay fp32 on every CPU branch
    assert n.autocast == (torch.bfloat16 if name == "bf16_mixed" else None)
    if speedup is not None:
        assert f"{speedup:.2f}x" in n.reason


def test_explicit_dtypes_and_refusal():
    assert choose_numerics("float32", CPU).autocast is None
    assert choose_numerics("bfloat16", CPU).weights == torch.bfloat16
    mixed = choose_numerics("bf16_mixed", CPU)
    assert (mixed.weights, mixed.autocast) == (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match="bf16_mixed"):
        choose_numerics("fp8", CPU)


def test_cpu_flags_read_from_cpuinfo(tmp_path, monkeypatch):
    monkeypatch.delenv(numerics.FLAGS_ENV)
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert {"avx512_bf16", "avx2"} <= cpu_flags(info)
    assert cpu_flags(tmp_path / "missing") == set()


def test_merged_lora_matmul_is_not_used_under_autocast(tiny_dir):
    from transformers import AutoModelForCausalLM

    from posttrain.models.lora import _fusable, apply_lora

    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_dir), r=4, alpha=8, dropout=0.0,
                       target_modules="all-linear")
    layer = next(m for m in model.modules() if hasattr(m, "lora_A"))
    x = torch.randn(2, 8, 64)
    assert _fusable(layer, x, (), {}) is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _fusable(layer, x, (), {}) is None


def _sft(tmp_path, tiny_dir, name: str, *extra: str) -> dict:
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(32))
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"model: {{name: {tiny_dir}}}\ndata: {{train: {data}, eval_fraction: 0.0}}\n"
                   f"train: {{max_steps: 2, micro_batch_size: 2, lr: 0.01}}\neval_samples: 0\n"
                   "lora: {r: 4, alpha: 8}\n")
    assert main(["sft", str(cfg), f"output_dir={tmp_path / name}", *extra]) == 0
    return json.loads((tmp_path / name / "summary.json").read_text())


def test_auto_picks_bf16_mixed_on_a_bf16_cpu_and_trains_like_fp32(tmp_path, tiny_dir, monkeypatch):
    from posttrain.methods.sft import SFT

    seen = []
    loss_sum = SFT.loss_sum

    def spy(self, model, batch):
        seen.append(torch.is_autocast_enabled("cpu"))
        out = loss_sum(self, model, batch)
        assert out[0].dtype in (torch.float32, torch.float64)  # the loss reduction stays fp32
        return out

    monkeypatch.setattr(SFT, "loss_sum", spy)
    fp32 = _sft(tmp_path, tiny_dir, "fp32", "model.dtype=float32")
    assert fp32["numerics"]["name"] == "float32" and not any(seen)

    seen.clear()
    monkeypatch.setattr(numerics, "cpu_flags", lambda: {"avx512_bf16"})
    monkeypatch.setattr(numerics, "bf16_probe_speedup", lambda: 2.4)
    auto = _sft(tmp_path, tiny_dir, "auto")
    assert auto["numerics"] == {"name": "bf16_mixed", "weights": "float32", "autocast": "bfloat16",
                                "reason": "CPU has avx512_bf16; a bf16 matmul probe ran 2.40x fp32"}
    assert seen and all(seen)
    # fp32 master weights: the saved adapter is fp32, and the loss follows the fp32 run's closely.
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "auto" / "adapter" / "adapter_model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float32}
    assert auto["final_loss"] == pytest.approx(fp32["final_loss"], rel=0.02)
    assert auto["final_loss"] != fp32["final_loss"]  # it did compute in bf16


def test_flags_can_be_forced_through_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(numerics.FLAGS_ENV, "avx2 amx_bf16")
    assert cpu_flags(tmp_path / "ignored") == {"avx2", "amx_bf16"}
    monkeypatch.setenv(numerics.FLAGS_ENV, "")
    assert choose_numerics("auto", CPU, probe=_never).name == "float32"  # what the whole suite runs with
