"""4-bit layers compute in one precision on every CPU: bitsandbytes' AVX512-BF16 switch is forced on and off here,
so the result does not depend on which machine runs the suite."""

import logging

import pytest
import torch

bnb_modules = pytest.importorskip("bitsandbytes.nn.modules")

from posttrain.models import (  # noqa: E402
    Quantization,
    load_model,
    quant,  # noqa: E402
)


def _linear4bit_layers(model):
    return [m for m in model.modules() if isinstance(m, bnb_modules.Linear4bit)]


@pytest.fixture
def bf16_cpu(monkeypatch):
    """What bitsandbytes sees on a CPU with AVX512-BF16: each Linear4bit built from now on carries the switch."""
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    monkeypatch.setattr(quant, "_told_bf16_switch", False)


def _one_token_logits(model, token: int = 300) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([[token]])).logits[0, -1]


def test_the_switch_is_real_in_this_bitsandbytes(tiny_dir, bf16_cpu):
    """The hazard keep_4bit_precision guards against: left on, an eval-mode no-grad forward repacks the weights for
    the bf16 kernel and rounds their scales to bf16. If a bitsandbytes upgrade renames the switch, this fails."""
    layer = bnb_modules.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.load_state_dict({"weight": torch.randn(64, 64)})
    layer = layer.to("cpu")  # quantizes
    assert getattr(layer, quant._BF16_SWITCH) is True
    layer.eval()
    try:
        with torch.no_grad():
            layer(torch.randn(1, 64))
    except Exception:  # noqa: BLE001 - without the CPU feature the repacked layout may have no kernel to run on
        pass
    state = layer.weight.quant_state
    assert state.packing_format_for_cpu is True and state.absmax.dtype == torch.bfloat16


def test_4bit_base_stays_on_dequantize_path_where_the_cpu_has_bf16(tiny_dir, bf16_cpu, capsys):
    loaded = load_model(tiny_dir, dtype="float32", quantization=Quantization())
    layers = _linear4bit_layers(loaded.model)
    assert len(layers) == 2 * 7 and not any(getattr(m, quant._BF16_SWITCH) for m in layers)
    assert "AVX512-BF16" in capsys.readouterr().out
    loaded.model.eval()
    got = _one_token_logits(loaded.model)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    # The same layers de-quantized to dense fp32 give the same logits: one precision, batch 1 included.
    quant.dequantize_(loaded.model)
    assert torch.allclose(got, _one_token_logits(loaded.model), atol=1e-5, rtol=0)
    # Said once per process, not on every load.
    load_model(tiny_dir, dtype="float32", quantization=Quantization())
    assert "AVX512-BF16" not in capsys.readouterr().out


def test_4bit_base_untouched_where_the_cpu_has_no_bf16(tiny_dir, monkeypatch, capsys):
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: False)
    monkeypatch.setattr(quant, "_told_bf16_switch", False)
    loaded = load_model(tiny_dir, dtype="float32", quantization=Quantization())
    assert quant.keep_4bit_precision(loaded.model, torch.float32) == 0
    assert "AVX512-BF16" not in capsys.readouterr().out


def test_hub_kernel_warning_is_dropped_but_other_bitsandbytes_messages_pass(caplog):
    import posttrain  # noqa: F401 - installs the filter

    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=log.name):
        log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "offline")
        log.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]
