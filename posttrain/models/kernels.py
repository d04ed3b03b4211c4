"""Liger's fused kernels as a switch (``model.liger``): RMSNorm, rotary embeddings and SwiGLU as Triton kernels.

Liger's cross-entropy kernels stay off: posttrain's chunked LM-head loss (``losses.cross_entropy``) already never
builds the (tokens x vocab) logits, and runs on trained positions only. Liger patches the modules in place (and
transformers' rotary function for that architecture), so LoRA layers and checkpoints are unaffected.
"""

from __future__ import annotations

import torch

from posttrain.errors import KernelError
from posttrain.models.lora import unwrap

KERNELS = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
           "fused_linear_cross_entropy": False}


def apply_liger(model: torch.nn.Module, device: torch.device) -> list[str]:
    """Patch ``model`` (a transformers model on ``device``, before or after LoRA) with Liger's kernels; returns
    their names."""
    if device.type != "cuda":
        raise KernelError(f"model.liger: Liger's kernels are Triton GPU kernels and the model is on {device}; "
                          "set model.liger: false (or model.compile: true, which fuses the same operations on a CPU)")
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError as e:
        raise KernelError("model.liger: true needs the liger-kernel package: pip install liger-kernel") from e
    _apply_liger_kernel_to_instance(model=unwrap(model), **KERNELS)
    return [k for k, on in KERNELS.items() if on]
