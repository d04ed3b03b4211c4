"""Token cross-entropy for SFT, computed from hidden states in chunks.

The LM head is applied only to positions that carry loss, ``chunk_size`` rows at a time. Each chunk's
gradient with respect to its hidden states (and the head weight, when it trains) is computed in the forward
pass, so the (tokens x vocab) logits never exist beyond one chunk and nothing is recomputed in backward.
Because the loss is a sum, the backward only scales those stored gradients by the incoming gradient.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def token_cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of -log softmax(logits)[target]. logits: (N, V), targets: (N,) -> scalar (fp32)."""
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, reduction="sum")


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int):
        need_w = ctx.needs_input_grad[1]
        need_h = ctx.needs_input_grad[0]
        acc = torch.promote_types(hidden.dtype, torch.float32)  # bf16 accumulates in fp32, fp64 stays fp64
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start:start + chunk_size]
            t = targets[start:start + chunk_size]
            # One row-wise log_softmax pass (each row stays in cache) instead of logsumexp's temporary and two
            # more full passes over the chunk.
            logp = torch.log_softmax((h @ weight.t()).to(acc), dim=-1)
            total -= logp.gather(1, t[:, None]).sum()
            if need_h or need_w:
                # d(sum CE)/d logits = softmax - onehot, in the log-probs' buffer.
                g = logp.exp_()
                g[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                g = g.to(hidden.dtype)
                if need_h:
                    grad_h[start:start + chunk_size] = g @ weight
                if need_w:
                    grad_w += (g.t() @ h).to(acc)
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_h if need_h else None, grad_w if need_w else None)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             chunk_size: int = 1024) -> torch.Tensor:
    """sum_n CE(hidden[n] @ weight.T, targets[n]) without materialising all logits.

    hidden: (N, H), weight: (V, H), targets: (N,) -> scalar fp32. Equal to
    ``token_cross_entropy_sum(hidden @ weight.T, targets)`` in value and gradients.
    """
    if hidden.shape[0] == 0:
        return hidden.sum().float() * 0.0
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_size)


class _TargetLogps(torch.autograd.Function):
    """log softmax(h @ W.T / tau)[t] per row for a frozen W, with d/dh = (W[t] - softmax @ W) / tau formed in the
    forward: the (rows x vocab) probabilities are used there and dropped, and backward is one scaling. With
    ``entropy`` it also returns each row's entropy -sum p log p (not differentiated), from the same log-probs."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                dtype: torch.dtype, temperature: float, entropy: bool):
        out = torch.empty(hidden.shape[0], dtype=dtype, device=hidden.device)
        ent = torch.zeros(hidden.shape[0] if entropy else 0, dtype=dtype, device=hidden.device)
        dlogp = torch.empty_like(hidden)
        for s in range(0, hidden.shape[0], chunk_size):
            t = targets[s:s + chunk_size]
            logp = torch.log_softmax((hidden[s:s + chunk_size] @ weight.t()).to(dtype).div_(temperature), -1)
            out[s:s + chunk_size] = logp.gather(1, t[:, None])[:, 0]
            if entropy:
                ent[s:s + chunk_size] = row_entropy(logp)
            probs = logp.exp_().to(hidden.dtype)
            dlogp[s:s + chunk_size] = torch.sub(weight[t], probs @ weight).div_(temperature)
        ctx.save_for_backward(dlogp)
        ctx.mark_non_differentiable(ent)
        return out, ent

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, grad_ent: torch.Tensor):
        (dlogp,) = ctx.saved_tensors
        return dlogp * grad_out.to(dlogp.dtype)[:, None], None, None, None, None, None, None


def row_entropy(logp: torch.Tensor) -> torch.Tensor:
    """(rows,) -sum_v p log p of (rows, V) log-probs, as one batched dot product (no (rows x V) product buffer)."""
    return -(logp.exp()[:, None, :] @ logp[:, :, None])[:, 0, 0]


def target_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                 dtype: torch.dtype, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(hidden @ W.T / temperature)[target] per row, a chunk of rows at a time in ``dtype``, so the
    (rows x vocab) logits exist one chunk at a time. With a frozen head (LoRA) the gradient for ``hidden`` is
    formed chunk by chunk in the forward (``_TargetLogps``); a trained head keeps each chunk's logits for autograd."""
    return target_logps_entropy(hidden, weight, targets, chunk_size, dtype, temperature, entropy=False)[0]


def target_logps_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                         dtype: torch.dtype, temperature: float = 1.0,
                         entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``target_logps`` and each row's entropy of softmax(hidden @ W.T / temperature) (detached; empty when
    ``entropy`` is False), from the same chunked log-probs."""
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=dtype), hidden.new_zeros(0, dtype=dtype)
    if torch.is_grad_enabled() and hidden.requires_grad and not weight.requires_grad:
        return _TargetLogps.apply(hidden, weight, targets, chunk_size, dtype, temperature, entropy)
    parts, ents = [], []
    for s in range(0, hidden.shape[0], chunk_size):
        logits = (hidden[s:s + chunk_size] @ weight.t()).to(dtype) / temperature
        logp = torch.log_softmax(logits, -1)
        parts.append(logp.gather(1, targets[s:s + chunk_size, None])[:, 0])
        if entropy:
            with torch.no_grad():
                ents.append(row_entropy(logp))
    return torch.cat(parts), torch.cat(ents) if entropy else hidden.new_zeros(0, dtype=dtype)


def token_kl_sum(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """sum_n KL(p_n || q_n) with p = softmax(logits[n]) the trained model and q = softmax(ref_logits[n]) the
    reference, over the full vocabulary (exact, not a sampled estimate). (N, V), (N, V) -> scalar fp32.

    The direction is the one RL and DPO penalise, KL(policy || reference), so "KL" means one thing in every log."""
    acc = torch.promote_types(logits.dtype, torch.float32)
    logp = torch.log_softmax(logits.to(acc), dim=-1)
    logq = torch.log_softmax(ref_logits.to(acc), dim=-1)
    return (logp.exp() * (logp - logq)).sum()


def linear_kl_sum(hidden: torch.Tensor, ref_hidden: torch.Tensor, weight: torch.Tensor,
                  chunk_size: int = 1024) -> torch.Tensor:
    """``token_kl_sum(hidden @ W.T, ref_hidden @ W.T)`` a chunk of rows at a time. Each chunk is recomputed in
    backward (activation checkpointing), so only one chunk's (rows x vocab) logits exist at once.
    hidden, ref_hidden: (N, H) (ref_hidden carries no gradient), weight: (V, H) -> scalar fp32."""
    return checkpointed_chunk_sum(lambda a, b: token_kl_sum(a @ weight.t(), b @ weight.t()), hidden, ref_hidden,
                                  chunk_size)


def checkpointed_chunk_sum(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], rows: torch.Tensor,
                           other_rows: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """sum over chunks of ``fn(rows[chunk], other_rows[chunk])``, each chunk under activation checkpointing: its
    (rows x vocab) intermediates are dropped after the forward and rebuilt in backward, so one chunk's exist at a
    time. ``fn`` returns a tensor of any fixed shape (several sums stacked); the result has that shape, in at
    least fp32. rows, other_rows: (N, ...) with the same N."""
    from torch.utils.checkpoint import checkpoint

    total = None
    for s in range(0, rows.shape[0], chunk_size):
        part = checkpoint(fn, rows[s:s + chunk_size], other_rows[s:s + chunk_size], use_reentrant=False)
        total = part if total is None else total + part
    if total is None:  # no rows: zeros of fn's shape, still connected to ``rows`` for a backward
        empty = fn(rows[:0], other_rows[:0])
        return empty * 0.0 + rows.sum() * 0.0
    return total
