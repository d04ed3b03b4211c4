"""`posttrain export --format peft`: the adapter alone in PEFT format, loaded back through plain PEFT and checked,
with what a LoRA server may not support named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from posttrain.io import atomic_dir, atomic_write_text
from posttrain.models import load_adapter
from posttrain.models.merge import lora_tensors
from posttrain.runs import base_of, init_adapter_of, load_run_base, resolve_adapter, run_quantization
from posttrain.ship.card import EMBEDDED_HUB_ID, write_card
from posttrain.ship.checks import REPORTS, check_mergeable, check_out

# vLLM's LoRA loader reads PEFT folders but not every PEFT feature; what it cannot apply it refuses or ignores.
_VLLM_LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj",
                "gate_up_proj"}


def serving_warnings(adapter_config: dict[str, Any]) -> list[str]:
    """What an adapter config asks for that a LoRA server (vLLM, posttrain serve) may not support."""
    warn = []
    if adapter_config.get("use_dora"):
        warn.append("use_dora: DoRA adapters are not served by vLLM's LoRA support")
    if adapter_config.get("modules_to_save"):
        warn.append(f"modules_to_save {adapter_config['modules_to_save']}: fully trained modules travel with the "
                    "adapter; vLLM serves only LoRA factors")
    targets = adapter_config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    odd = sorted(set(targets) - _VLLM_LINEAR)
    if odd:
        warn.append(f"target_modules {odd}: not the attention/MLP projections vLLM adapts")
    if adapter_config.get("bias", "none") != "none":
        warn.append(f"bias: {adapter_config['bias']}: trained biases are not part of a LoRA server's adapter")
    return warn


def export_run(adapter: str, out: str, *, model_name: str | None = None, dtype: str = "auto",
               device: str = "auto", workflow: dict[str, Any] | None = None) -> dict[str, Any]:
    """The adapter alone in PEFT format (adapter_config.json + adapter_model.safetensors), loaded back and checked,
    with a model card (README.md; ``workflow``: a running workflow's state for it)."""
    check_mergeable(adapter)
    dest = check_out(out, adapter)
    src = resolve_adapter(adapter)
    name = model_name or base_of(adapter)
    config = json.loads((src / "adapter_config.json").read_text())
    weights = src / "adapter_model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{src} has no adapter_model.safetensors (an old .bin adapter? re-save it)")
    quant = run_quantization(adapter)
    init = init_adapter_of(adapter)

    def write(tmp: Path) -> None:
        shutil.copy2(weights, tmp / weights.name)
        # The run may record a temporary or cache path; a server needs the base's real name.
        config["base_model_name_or_path"] = name or EMBEDDED_HUB_ID
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
        for f in src.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copy2(f, tmp / f.name)

    dest = atomic_dir(dest, write)
    # Load back through PEFT alone, as a server would, and check every saved factor arrived in the model.
    loaded = load_run_base(name, adapter, dtype=dtype, device=device)
    from safetensors.torch import load_file

    saved = load_file(str(dest / weights.name))
    held = lora_tensors(load_adapter(loaded.model, str(dest)))
    missing = sorted(set(saved) - set(held))
    worst = max((float((held[k] - saved[k].to(held[k].dtype)).abs().max()) for k in saved if k in held), default=0.0)
    if missing:
        raise RuntimeError(f"{len(missing)} saved tensors did not load into the model through PEFT, e.g. {missing[0]}")
    notes = serving_warnings(config)
    if init:
        notes.append(f"trained on top of {init}: serve it on that adapter merged into the base "
                     f"(`posttrain merge {init} --out DIR`), not on the bare base")
    if quant:
        notes.append("trained against a 4-bit base: load the base in nf4, or serve the de-quantized base "
                     "(`posttrain merge` of this adapter writes it merged), to get the outputs seen in training")
    # posttrain serve reads quantization and init_adapter from here to refuse a base the adapter was not trained on.
    report = {"adapter": str(src), "base": config["base_model_name_or_path"], "tensors": len(saved),
              "quantization": quant.kind if quant else None, "init_adapter": init,
              "max_abs_diff_after_reload": worst, "rank": config.get("r"), "alpha": config.get("lora_alpha"),
              "target_modules": config.get("target_modules"), "notes": notes}
    atomic_write_text(dest / REPORTS[1], json.dumps(report, indent=2))
    write_card(dest, adapter, base=name, kind="peft", export=report, workflow=workflow)
    return report

