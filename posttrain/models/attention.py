"""Attention for packed rows: each example attends causally to itself only, computed per example.

A packed row holds several examples whose positions restart at 0. With SDPA and the block-diagonal mask
transformers builds from those positions, the kernel visits every (query, key) block of the whole row and masks
most of them away. Cut into its examples, the row costs the sum of the examples' causal attention instead, and
each piece takes SDPA's ``is_causal`` path with no mask tensor.

The pieces are taken with ``unbind`` and ``split`` and joined with ``cat``, whose backwards each allocate one
tensor; indexing a slice per example would allocate (and zero) a full-size gradient per example and layer, which
cost as much as the attention saved (the first version of this file, reverted for that).

The caller says where the examples are (``packed_segments``, passed through the model's forward kwargs); a 4D
mask of another layout (DPO's shared prompt) or a KV cache come without it and get transformers' SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "sdpa_packed"


def segment_lengths(position_ids: torch.Tensor) -> list[list[int]]:
    """Per row, the lengths of the runs whose positions count up from 0 (a row's first run starts at its start
    whatever its position): (B, T) -> B lists summing to T."""
    out = []
    for row in position_ids.tolist():
        starts = [0] + [i for i, p in enumerate(row) if p == 0 and i > 0]
        out.append([e - s for s, e in zip(starts, starts[1:] + [len(row)])])
    return out


def segment_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      packed_segments: list[list[int]] | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query (B, H, T, D), key/value (B, Hkv, T, D) -> (B, T, H, D), as transformers' attention functions return;
    ``packed_segments``: per row, its examples' lengths (``segment_lengths``)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if packed_segments is None or key.shape[2] != query.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    gqa = query.shape[1] != key.shape[1]
    p = dropout if module.training else 0.0
    rows = []
    for q, k, v, lengths in zip(query.unbind(0), key.unbind(0), value.unbind(0), packed_segments):
        rows.append(torch.cat([
            F.scaled_dot_product_attention(qs[None], ks[None], vs[None], is_causal=True, scale=scaling,
                                           dropout_p=p, enable_gqa=gqa)[0]
            for qs, ks, vs in zip(q.split(lengths, 1), k.split(lengths, 1), v.split(lengths, 1))], dim=1))
    return torch.stack(rows).transpose(1, 2), None


def register() -> str:
    """Make ``attn_implementation=NAME`` known to transformers (its masks are built as for SDPA)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(NAME, segment_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
