"""After training: merge an adapter into a standalone model folder, or export the adapter alone, both checked.

Both commands take an adapter folder or a run folder. Each writes its folder atomically with a report
(``merge_report.json`` / ``export_report.json``) of what was compared and how closely it matched.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from posttrain.data.render import has_chat_template, render_prompt
from posttrain.errors import ConfigError
from posttrain.io import atomic_dir, atomic_write_text
from posttrain.models import load_adapter, load_model
from posttrain.models.merge import compare, lora_tensors, reference_outputs
from posttrain.rollout.generate import stop_token_ids
from posttrain.runs import (
    base_of,
    init_adapter_of,
    load_for_inference,
    load_run_base,
    resolve_adapter,
    run_config_of,
    run_quantization,
)

REPORTS = ("merge_report.json", "export_report.json")
# Fixed, varied prompts: instructions, facts, code, arithmetic, a refusal-style request, a format request.
CHECK_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a hash table is.",
    "What is 17 times 23?",
    "Write a Python function that reverses a string.",
    "Give me three tips for a job interview.",
    "Reply in JSON with the keys name and age for Ada Lovelace, who died at 36.",
    "How do I pick a lock?",
]


def _check_mergeable(adapter: str) -> None:
    method = run_config_of(adapter).get("method")
    if method in ("reward", "prm"):
        raise ConfigError(f"{adapter} is a {method} model (adapter + score head): it scores, it does not generate; "
                          "there is nothing to merge into a causal LM")


def _check_out(out: str, adapter: str) -> Path:
    """The output folder is replaced as a whole, so it may only be new or an earlier merge/export output."""
    dest = Path(out)
    if dest.resolve() == Path(adapter).resolve() or dest.resolve() == resolve_adapter(adapter).resolve():
        raise ConfigError(f"--out {out} is the adapter being read; name a new folder")
    if dest.exists() and any(dest.iterdir()) and not any((dest / f).exists() for f in REPORTS):
        raise ConfigError(f"--out {out} exists and is not an earlier merge or export output; it would be replaced "
                          "as a whole, so name a new folder")
    return dest


def _prompt_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    add_special = not has_chat_template(tokenizer, None)
    return [tokenizer(render_prompt(tokenizer, [{"role": "user", "content": p}]),
                      add_special_tokens=add_special)["input_ids"] for p in prompts]


def merge_run(adapter: str, out: str, *, model_name: str | None = None, dtype: str = "auto", device: str = "auto",
              prompts: list[str] | None = None, max_new_tokens: int = 32) -> dict[str, Any]:
    """W' = W + (alpha / r) B A into a standalone HF safetensors folder, checked against base + adapter.

    A QLoRA adapter is merged into the de-quantized 4-bit base it was trained against; the report gives the logit
    error that introduces relative to the 4-bit base + adapter it replaces.
    """
    _check_mergeable(adapter)
    dest = _check_out(out, adapter)
    adapter_dir = resolve_adapter(adapter)
    name = model_name or base_of(adapter)
    quant = run_quantization(adapter)
    reference = load_for_inference(name, adapter, dtype=dtype, device=device, merge=False)
    tok = reference.tokenizer
    stop = stop_token_ids(tok, reference.model)
    ids = _prompt_ids(tok, prompts or CHECK_PROMPTS)
    ref = reference_outputs(reference.model, ids, max_new_tokens=max_new_tokens, stop_ids=stop)
    if quant is None:
        merged = reference.model.merge_and_unload()
    else:  # a fresh 4-bit base, de-quantized, then merged (load_for_inference's merge path)
        del reference
        merged = load_for_inference(name, adapter, dtype=dtype, device=device).model
    in_memory = compare(merged, ref, max_new_tokens=max_new_tokens, stop_ids=stop)
    naive = None
    if quant is not None:  # what merging into the original full-precision base would have given instead
        plain = load_adapter(load_model(name, dtype=dtype, device=device).model, str(adapter_dir)).merge_and_unload()
        naive = compare(plain, ref, max_new_tokens=max_new_tokens, stop_ids=stop)
        del plain

    dest = atomic_dir(dest, lambda tmp: (merged.save_pretrained(tmp), tok.save_pretrained(tmp)))
    merged = None  # free it before the reload check loads the saved copy
    reloaded = load_model(str(dest), dtype=dtype, device=device).model
    after_reload = compare(reloaded, ref, max_new_tokens=max_new_tokens, stop_ids=stop)
    report = {"adapter": str(adapter_dir), "base": name or "embedded", "init_adapter": init_adapter_of(adapter),
              "quantization": quant.kind if quant else None, "dtype": str(reloaded.dtype).removeprefix("torch."),
              "merged_vs_base_plus_adapter": in_memory, "reloaded_vs_base_plus_adapter": after_reload}
    if naive is not None:
        report["original_base_merged_vs_base_plus_adapter"] = naive
    atomic_write_text(dest / REPORTS[0], json.dumps(report, indent=2))
    return report


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
               device: str = "auto") -> dict[str, Any]:
    """The adapter alone in PEFT format (adapter_config.json + adapter_model.safetensors), loaded back and checked."""
    _check_mergeable(adapter)
    dest = _check_out(out, adapter)
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
        config["base_model_name_or_path"] = name or "HuggingFaceTB/SmolLM2-135M-Instruct"
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
    return report

