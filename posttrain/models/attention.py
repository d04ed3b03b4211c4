"""Attention for packed rows: each example attends causally to itself only, computed per example.

A packed row holds several examples whose positions restart at 0. With SDPA and the block-diagonal mask
transformers builds from those positions, the kernel still visits every (query, key) block of the whole row and
masks most of them away; cut into its examples, the row costs the sum of the examples' causal attention instead of
the row's, and each piece takes SDPA's ``is_causal`` path (no mask tensor at all).

The caller says where the examples are (``packed_segments``, passed through the model's forward kwargs): a 4D
mask of another layout (DPO's shared prompt) or a KV cache during generation come without it and get plain SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "sdpa_packed"


def segment_bounds(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the [start, end) spans where positions count up from 0: (B, T) -> B lists of spans."""
    out = []
    for row in position_ids.tolist():
        starts = [i for i, p in enumerate(row) if p == 0] or [0]
        if starts[0] != 0:
            starts.insert(0, 0)
        out.append(list(zip(starts, starts[1:] + [len(row)])))
    return out


def segment_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      packed_segments: list[list[tuple[int, int]]] | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """query (B, H, T, D), key/value (B, Hkv, T, D) -> (B, T, H, D), as transformers' attention functions return;
    ``packed_segments``: per row, the [start, end) spans of its examples (``segment_bounds``)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if packed_segments is None or key.shape[2] != query.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    gqa = query.shape[1] != key.shape[1]
    rows = []
    for b, spans in enumerate(packed_segments):
        rows.append(torch.cat([F.scaled_dot_product_attention(
            query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e], is_causal=True, scale=scaling,
            dropout_p=dropout if module.training else 0.0, enable_gqa=gqa) for s, e in spans], dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def register() -> str:
    """Make ``attn_implementation=NAME`` known to transformers (its masks are built as for SDPA)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(NAME, segment_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
