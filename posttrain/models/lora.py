"""LoRA through PEFT, full fine-tuning, and a trainable-parameter report."""

from __future__ import annotations

import functools
from collections import defaultdict

import torch
import torch.nn.functional as F

# Rows at which x @ (W + s B A)^T beats x @ W^T + s (x @ A^T) @ B^T: building W + s B A costs as much as a matmul
# with r rows, so below ~16 r rows (decoding) the two skinny matmuls are cheaper.
MERGED_MIN_ROWS = 256


class _MergedLoRALinear(torch.autograd.Function):
    """y = x @ (W + s B A)^T + bias for a frozen W, with gradients for x, A, B and bias.

    PEFT computes base(x) + s * B(A(x)): two skinny matmuls, a scaled copy and a sum, each writing a fresh
    (tokens x out) tensor, and as many again in backward. On a CPU those full-size passes cost about as much as
    the skinny matmuls themselves (they are memory-bound and fault in new pages), so here the forward is one
    matmul with the merged weight, and the backward one matmul for x plus the two rank-r weight gradients.
    W + s B A is rebuilt in backward instead of kept (it costs r/T of the matmul that uses it).
    Only for fp32/fp64: in bf16, W + s B A would round the small update s B A away."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(x, weight, a, b)
        ctx.scale, ctx.has_bias = scale, bias is not None
        return F.linear(x, torch.addmm(weight, b, a, alpha=scale), bias)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, weight, a, b = ctx.saved_tensors
        s = ctx.scale
        g = grad_y.reshape(-1, grad_y.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        need_x, _, need_bias, need_a, need_b, _ = ctx.needs_input_grad
        grad_x = (g @ torch.addmm(weight, b, a, alpha=s)).view_as(x) if need_x else None
        grad_a = (g @ b).t().mm(x2).mul_(s) if need_a else None
        grad_b = g.t().mm(x2 @ a.t()).mul_(s) if need_b else None
        grad_bias = g.sum(0) if need_bias and ctx.has_bias else None
        return grad_x, None, grad_bias, grad_a, grad_b, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, scale: float) -> torch.Tensor:
    """x @ W^T + bias + scale * (x @ A^T) @ B^T for a frozen W (weight: (out, in), a: (r, in), b: (out, r))."""
    if x.numel() // x.shape[-1] >= MERGED_MIN_ROWS:
        return _MergedLoRALinear.apply(x, weight, bias, a, b, scale)
    return F.linear(x, weight, bias).add_(F.linear(F.linear(x, a), b), alpha=scale)


def _fusable(layer, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
    """The one active plain-LoRA adapter ``lora_linear`` computes exactly like PEFT, else None."""
    # Under autocast the merged W + s B A would be formed in bf16, where a small update rounds away; PEFT's two
    # paths keep the adapter's contribution separate, as TRL's bf16 runs do.
    if args or kwargs or layer.disable_adapters or layer.merged or layer.fan_in_fan_out \
            or torch.is_autocast_enabled(x.device.type):
        return None
    active = layer.active_adapters
    if len(active) != 1 or active[0] not in layer.lora_A or active[0] in layer.lora_variant:
        return None
    name = active[0]
    weight = layer.base_layer.weight
    if (type(layer.base_layer) is not torch.nn.Linear or weight.requires_grad
            or weight.dtype not in (torch.float32, torch.float64) or x.dtype != weight.dtype
            or layer.lora_A[name].weight.dtype != weight.dtype
            or not isinstance(layer.lora_dropout[name], torch.nn.Identity)):
        return None
    return name


@functools.cache
def _fast_lora_class(base: type) -> type:
    class FastLoraLinear(base):
        """PEFT's LoRA Linear whose plain single-adapter forward goes through ``lora_linear``; anything else
        (dropout, DoRA, several or disabled adapters, merged weights, bf16) takes PEFT's own forward."""

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            name = _fusable(self, x, args, kwargs)
            if name is None:
                return super().forward(x, *args, **kwargs)
            return lora_linear(x, self.base_layer.weight, self.base_layer.bias, self.lora_A[name].weight,
                               self.lora_B[name].weight, self.scaling[name])

    FastLoraLinear.__name__ = FastLoraLinear.__qualname__ = base.__name__
    return FastLoraLinear


def fuse_lora_forward(model: torch.nn.Module) -> int:
    """Route every plain PEFT LoRA Linear of ``model`` through ``lora_linear``; returns how many. The modules,
    parameters and state dict are unchanged (only the class's forward differs), so saving, merging and PEFT's
    adapter switches work as before."""
    from peft.tuners.lora.layer import Linear

    fast = _fast_lora_class(Linear)
    n = 0
    for module in model.modules():
        if type(module) is Linear:
            module.__class__ = fast
            n += 1
    return n


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def apply_lora(model: torch.nn.Module, *, r: int, alpha: float, dropout: float,
               target_modules: str | list[str]) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                     bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    fuse_lora_forward(model)
    return model


def load_adapter(model: torch.nn.Module, adapter_dir: str, *, trainable: bool = False) -> torch.nn.Module:
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)
    fuse_lora_forward(model)
    return model


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
