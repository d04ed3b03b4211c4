"""4-bit NormalFloat bases (QLoRA) through bitsandbytes: loading options, byte accounting, de-quantization."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Quantization:
    """How the base's linear layers are stored; the adapters and everything else stay in ``compute_dtype``."""
    kind: str = "nf4"
    double_quant: bool = True  # quantize the per-block absmax scales too: ~0.37 -> ~0.127 extra bits per weight


def bnb_config(q: Quantization, compute_dtype: torch.dtype):
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError("model.quantization: nf4 needs bitsandbytes: pip install 'posttrain[qlora]'")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.kind, bnb_4bit_use_double_quant=q.double_quant,
                              bnb_4bit_compute_dtype=compute_dtype)


# bitsandbytes (0.49+) marks every Linear4bit with ``support_avx512bf16_for_cpu`` when the CPU has AVX512-BF16. Such
# a layer, once it runs in eval mode on a no-grad input, repacks its weight for a fused kernel that computes in bf16,
# and rounds its absmax scales to bf16 for good. Generation and evaluation would then see other weights, in another
# precision, than training (dequantize + matmul in the compute dtype), and a merge check would compare fp32 against
# bf16. posttrain keeps every 4-bit layer on the dequantize path, whatever the CPU, so precision never depends on the
# machine, the batch shape or train/eval mode. Decoding then de-quantizes each layer per token: slower on those CPUs,
# but the same numbers everywhere.
_BF16_SWITCH = "support_avx512bf16_for_cpu"
_told_bf16_switch = False


def keep_4bit_precision(model: torch.nn.Module, compute_dtype: torch.dtype) -> int:
    """Turn off bitsandbytes' eval-mode switch to its bf16 CPU kernel on every 4-bit layer; returns how many had it.

    Says so once per process where it mattered (an AVX512-BF16 CPU), instead of the hub-download warning
    bitsandbytes prints on import there.
    """
    global _told_bf16_switch
    switched = 0
    for module in model.modules():
        if getattr(module, _BF16_SWITCH, False):
            if getattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu", False):
                raise RuntimeError(f"{type(module).__name__} already repacked for bitsandbytes' bf16 CPU kernel; "
                                   "call keep_4bit_precision right after loading, before any forward")
            setattr(module, _BF16_SWITCH, False)
            switched += 1
    if switched and not _told_bf16_switch:
        _told_bf16_switch = True
        name = str(compute_dtype).removeprefix("torch.")
        print(f"note: this CPU has AVX512-BF16, where bitsandbytes runs 4-bit layers in bf16 whenever they run "
              f"without gradients (generation, evaluation); posttrain keeps all {switched} of them on "
              f"dequantize + matmul in {name}, so generation, evaluation and training see the same weights")
    return switched


def _is_4bit(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return getattr(weight, "quant_state", None) is not None


def is_quantized(model: torch.nn.Module) -> bool:
    return any(_is_4bit(m) for m in model.modules())


def _state_bytes(state) -> int:
    """Bytes of a bitsandbytes QuantState: absmax (8-bit when double-quantized) plus its own nested state."""
    total = state.absmax.numel() * state.absmax.element_size() + state.code.numel() * state.code.element_size()
    if getattr(state, "state2", None) is not None:
        total += _state_bytes(state.state2)
    if getattr(state, "offset", None) is not None:
        total += state.offset.numel() * state.offset.element_size()
    return total


def weight_bytes(model: torch.nn.Module, unquantized_dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """Bytes the base's weights take now, and what the 4-bit layers would take in ``unquantized_dtype``.

    ``quantized`` counts the packed 4-bit weights plus their scales; ``dense`` everything else (embeddings, norms,
    LM head, LoRA factors). Tied weights count once.
    """
    out = {"quantized": 0, "quantized_as_dense": 0, "dense": 0, "quantized_params": 0}
    size = unquantized_dtype.itemsize
    seen: set[int] = set()
    for module in model.modules():
        if _is_4bit(module) and id(module.weight) not in seen:  # PEFT's wrapper exposes its base layer's weight
            w = module.weight
            seen.add(id(w))
            out["quantized"] += w.numel() * w.element_size() + _state_bytes(w.quant_state)
            n = w.quant_state.shape.numel()
            out["quantized_params"] += n
            out["quantized_as_dense"] += n * size
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out["dense"] += p.numel() * p.element_size()
    return out


def format_weight_bytes(b: dict[str, int], dense_dtype: torch.dtype) -> str:
    """One line: base bytes before and after, and the 4-bit layers' ratio to bf16 and to the compute dtype."""
    if not b["quantized_params"]:
        return f"base weights {b['dense'] / 1e6:.1f} MB (not quantized)"
    as_compute = b["quantized_params"] * dense_dtype.itemsize
    before, after = b["dense"] + as_compute, b["dense"] + b["quantized"]
    return (f"base weights {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB; the {b['quantized_params'] / 1e6:.1f}M "
            f"quantized weights take {b['quantized'] / 1e6:.1f} MB: {b['quantized_as_dense'] / b['quantized']:.2f}x "
            f"less than bf16, {as_compute / b['quantized']:.2f}x less than {str(dense_dtype).removeprefix('torch.')}")


def dequantize_(model: torch.nn.Module) -> int:
    """Replace every 4-bit linear layer by a dense one holding exactly the de-quantized weights, in place.

    A QLoRA adapter was trained against these values, not the original full-precision ones, so this is the base it
    must be merged into (merging into the 4-bit layer would re-quantize W + BA and lose most of the update).
    Returns the number of layers replaced.
    """
    import bitsandbytes.functional as bnbf

    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not _is_4bit(child):
                continue
            w = child.weight
            dense_w = bnbf.dequantize_4bit(w.data, w.quant_state).to(w.quant_state.dtype)
            dense = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                    device=dense_w.device, dtype=dense_w.dtype)
            dense.weight.data.copy_(dense_w)
            if child.bias is not None:
                dense.bias.data.copy_(child.bias.data)
            setattr(parent, name, dense)
            replaced += 1
    if replaced:
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(model.config, attr):
                delattr(model.config, attr)
        model.hf_quantizer = None
        model.is_quantized = False
        model.is_loaded_in_4bit = False
    return replaced
