"""torch.compile as a switch (``model.compile``): each decoder layer compiled on its own (regional compilation).

Compiling the repeated block instead of the whole model gives one set of graphs that every layer reuses (compiled
once, in the first steps), and leaves the chunked loss, the optimizer and the per-example attention to eager
PyTorch. Inductor fuses what eager runs as separate memory-bound passes: RMSNorm, rotary embeddings, SiLU x up,
residual adds, and their backwards. The per-example attention walks a Python list of segments that changes with
every batch, so it stays outside the graph (``torch.compiler.disable`` in ``attention.register``) and its layout
travels as an opaque ``attention.Layout``; a plain list would be guarded element by element and recompile the
layers for each new layout.

Not combined with activation checkpointing (refused in the config): the graph break at the attention inside a
checkpointed layer makes dynamo run the whole layer eagerly.

Decoding (sampling, generation) runs the same layers eagerly (``eager``): one token per row through a KV cache
is another graph per cache shape, and compiling those would cost more than it saves in a short rollout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks (LlamaDecoderLayer, Qwen2DecoderLayer, ...): what is compiled, and FSDP2's
    sharding units."""
    return [m for m in model.modules() if type(m).__name__.endswith(("DecoderLayer", "Block"))]


# Variants per layer: gradient on or off (reference and rollout forwards), adapters on or off (the reference of
# LoRA DPO/GRPO), first layer's input without gradient; the default limit of 8 would fall back to eager.
RECOMPILE_LIMIT = 32


def compile_layers(model: torch.nn.Module) -> int:
    """Compile every decoder layer of ``model`` in place, shapes dynamic from the start; returns how many."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def is_compiled(model: torch.nn.Module) -> bool:
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in decoder_layers(model))


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Run compiled modules as plain PyTorch inside this block."""
    with torch.compiler.set_stance("force_eager"):
        yield
