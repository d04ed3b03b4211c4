"""LoRA through PEFT, full fine-tuning, and a trainable-parameter report."""

from __future__ import annotations

from collections import defaultdict

import torch


def apply_lora(model: torch.nn.Module, *, r: int, alpha: float, dropout: float,
               target_modules: str | list[str]) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                     bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def load_adapter(model: torch.nn.Module, adapter_dir: str, *, trainable: bool = False) -> torch.nn.Module:
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)


def prepare_full(model: torch.nn.Module) -> torch.nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def trainable_report(model: torch.nn.Module) -> dict:
    """Trainable and total parameter counts, overall and grouped by leaf module name (q_proj, lora_A, ...)."""
    total = trainable = 0
    by_module: dict[str, int] = defaultdict(int)
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:  # tied weights count once
            continue
        seen.add(id(p))
        # A 4-bit weight is stored packed two per byte; count the weights it stands for.
        n = p.quant_state.shape.numel() if getattr(p, "quant_state", None) is not None else p.numel()
        total += n
        if p.requires_grad:
            trainable += n
            parts = [s for s in name.split(".") if not s.isdigit() and s not in {"weight", "bias", "default"}]
            by_module[".".join(parts[-2:])] += p.numel()
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1),
            "by_module": dict(sorted(by_module.items()))}


def format_trainable(report: dict) -> str:
    return (f"trainable params: {report['trainable']:,} || all params: {report['total']:,} "
            f"|| trainable%: {report['percent']:.4f}")
