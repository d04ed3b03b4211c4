"""Attention for packed rows: each example attends causally to itself only, computed per example.

A packed row holds several examples whose positions restart at 0. With SDPA and the block-diagonal mask
transformers builds from those positions, the kernel visits every (query, key) block of the whole row and masks
most of them away. Cut into its examples, the row costs the sum of the examples' causal attention instead, and
each piece takes SDPA's ``is_causal`` path with no mask tensor.

The pieces are taken with ``unbind`` and ``split`` and joined with ``cat``, whose backwards each allocate one
tensor; indexing a slice per example would allocate (and zero) a full-size gradient per example and layer, which
cost as much as the attention saved (the first version of this file, reverted for that).

A segment may also be a shared prefix with branches, ``(prefix, [b1, b2, ...])``: the layout of a DPO pair
(prompt | chosen | rejected) or of a GRPO group (prompt | c1 | ... | cG), where every branch sees the prefix and
itself, causally, and never another branch. The prefix is attended causally on its own, and each branch's queries
attend to the prefix's keys and its own under a bottom-right causal mask of (branch x prefix + branch): the cost of
each sequence alone, where one masked SDPA over the row pays for (row length)^2.

The caller says where the examples are (``packed_segments``, passed through the model's forward kwargs); a KV
cache or a call without it gets transformers' SDPA.
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


Segment = int | tuple[int, list[int]]


class Layout:
    """A batch's segments as the model's forward carries them. Opaque to torch.compile, where a plain list would
    be guarded element by element and recompile the compiled layers for every new layout."""

    __slots__ = ("rows",)

    def __init__(self, rows: list[list[Segment]]):
        self.rows = rows


def uses_segments(model: torch.nn.Module) -> bool:
    """Whether ``model`` (a transformers model) runs this attention, i.e. reads ``packed_segments``."""
    return getattr(model.config, "_attn_implementation", None) == NAME


def branch_segments(branch: torch.Tensor, block: torch.Tensor) -> list[list[Segment]] | None:
    """Per row, the segments of a branch/block layout (``collate_pairs``, ``collate_rollouts``): a block is a prefix
    (branch 0) followed by contiguous branches. None if a block is laid out otherwise."""
    out = []
    for br, bl in zip(branch.tolist(), block.tolist()):
        runs: list[list[int]] = []  # [block, branch, length]
        for a, b in zip(bl, br):
            if runs and runs[-1][0] == a and runs[-1][1] == b:
                runs[-1][2] += 1
            else:
                runs.append([a, b, 1])
        row: list[Segment] = []
        k = 0
        while k < len(runs):
            blk = runs[k][0]
            prefix = runs[k][2] if runs[k][1] == 0 else 0
            k += 1 if prefix else 0
            branches, seen = [], set()
            while k < len(runs) and runs[k][0] == blk:
                if runs[k][1] == 0 or runs[k][1] in seen:  # a prefix after a branch, or a branch cut in two
                    return None
                seen.add(runs[k][1])
                branches.append(runs[k][2])
                k += 1
            row.append((prefix, branches) if branches else prefix)
        out.append(row)
    return out


def _split_sizes(row: list[Segment]) -> list[int]:
    return [n for seg in row for n in ([seg] if isinstance(seg, int) else [seg[0], *seg[1]]) if n]


def segment_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      packed_segments: Layout | list[list[Segment]] | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """query (B, H, T, D), key/value (B, Hkv, T, D) -> (B, T, H, D), as transformers' attention functions return;
    ``packed_segments``: per row, its segments in order: a length (``segment_lengths``) or a shared prefix with
    its branches' lengths (``branch_segments``)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if isinstance(packed_segments, Layout):
        packed_segments = packed_segments.rows
    if packed_segments is None or key.shape[2] != query.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    gqa = query.shape[1] != key.shape[1]
    p = dropout if module.training else 0.0

    def sdpa(q, k, v, mask=None):
        return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, is_causal=mask is None,
                                              scale=scaling, dropout_p=p, enable_gqa=gqa)[0]

    rows = []
    for q, k, v, row in zip(query.unbind(0), key.unbind(0), value.unbind(0), packed_segments):
        sizes = _split_sizes(row)
        qs, ks, vs = iter(q.split(sizes, 1)), iter(k.split(sizes, 1)), iter(v.split(sizes, 1))
        outs = []
        for seg in row:
            prefix, branches = (seg, []) if isinstance(seg, int) else seg
            if prefix:
                qp, kp, vp = next(qs), next(ks), next(vs)
                outs.append(sdpa(qp, kp, vp))
            for n in branches:
                qb, kb, vb = next(qs), next(ks), next(vs)
                if not prefix:
                    outs.append(sdpa(qb, kb, vb))
                    continue
                visible = torch.ones(n, prefix + n, dtype=torch.bool, device=q.device).tril(prefix)
                outs.append(sdpa(qb, torch.cat([kp, kb], 1), torch.cat([vp, vb], 1), visible))
        rows.append(torch.cat(outs, dim=1))
    return torch.stack(rows).transpose(1, 2), None


def register() -> str:
    """Make ``attn_implementation=NAME`` known to transformers (its masks are built as for SDPA)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    # Outside any compiled graph: its Python walk over segments changes with every batch's layout.
    AttentionInterface.register(NAME, torch.compiler.disable(segment_attention))
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
