"""The model-on-a-batch blocks shared by methods, rollouts and evals; imports data, losses, errors."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from posttrain.data.collate import IGNORE
from posttrain.losses.cross_entropy import row_entropy, target_logps_entropy
from posttrain.models.attention import Layout, branch_segments, segment_lengths, uses_segments
from posttrain.models.lora import unwrap


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd graph; the caller's training flag comes back even on error."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


Batch = dict[str, torch.Tensor]  # a collated batch: named tensors (data.collate: SFTBatch, PairBatch, RolloutBatch)


def plain_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The LM head if logits are exactly hidden @ W.T (no bias, soft-capping or scaling), else None."""
    cfg = model.config
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return None
    head = model.get_output_embeddings()
    if type(head) is torch.nn.Linear and head.bias is None:
        return head
    return None


def model_inputs(model: torch.nn.Module,
                 batch: Batch) -> tuple[torch.nn.Module, dict, torch.Tensor, torch.Tensor]:
    """(inner model, forward kwargs, next-token targets, target mask) of an SFT batch, on the model's device."""
    inner = unwrap(model)
    device = next(inner.parameters()).device
    ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
    segments = uses_segments(inner)
    if segments:
        ids, labels, pos = one_row(ids, labels, pos, batch.get("row_tokens"))
    targets = labels[:, 1:].to(device)
    kwargs = {"input_ids": ids.to(device), "position_ids": pos.to(device), "use_cache": False}
    if segments:
        kwargs["packed_segments"] = Layout(segment_lengths(pos))  # where each packed example lies, for its attention
    return inner, kwargs, targets, targets != IGNORE


def one_row(ids: torch.Tensor, labels: torch.Tensor, pos: torch.Tensor,
            row_tokens: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """The rows' real tokens laid end to end in one row, padding dropped. With attention computed per example the
    row boundaries mean nothing, and every padding position would cost a full pass through the layers. No target
    crosses a join: each segment's first label is IGNORE (``collate``)."""
    if row_tokens is None or (ids.shape[0] == 1 and int(row_tokens[0]) == ids.shape[1]):
        return ids, labels, pos
    real = torch.arange(ids.shape[1], device=ids.device) < row_tokens.to(ids.device)[:, None]
    return ids[real][None], labels[real][None], pos[real][None]


def pair_attention_mask(batch: Batch, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """(B, 1, T, T) additive mask for a shared-prompt batch: causal, within a pair, and a response never sees the
    other response. None when no prompt is shared: then restarting positions alone give transformers the
    block-diagonal mask (and flash attention stays usable)."""
    branch, block = batch["branch"], batch["block"]
    if not bool((branch == 0).any()):
        return None
    t = branch.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    same_pair = block[:, :, None] == block[:, None, :]
    visible = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])
    allowed = (causal & same_pair & visible).to(device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def pair_hidden(model: torch.nn.Module, batch: Batch, decoder_only: bool) -> torch.Tensor:
    """Last hidden states (or logits, when not ``decoder_only``) of a branch/block batch (pairs or rollouts),
    flattened to (B * T, -1)."""
    inner = unwrap(model)
    param = next(inner.parameters())
    kw = {"input_ids": batch["input_ids"].to(param.device), "position_ids": batch["position_ids"].to(param.device),
          "use_cache": False}
    segments = None
    if uses_segments(inner):
        # Every sequence attended on its own (prefix once, each branch against it): no (T x T) mask at all.
        shared = bool((batch["branch"] == 0).any())
        segments = branch_segments(batch["branch"], batch["block"]) if shared else \
            segment_lengths(batch["position_ids"])
    if segments is not None:
        kw["packed_segments"] = Layout(segments)
    else:
        mask = pair_attention_mask(batch, param.dtype, param.device)
        if mask is not None:
            kw["attention_mask"] = mask
    out = inner.get_decoder()(**kw).last_hidden_state if decoder_only else inner(**kw).logits
    return out.reshape(-1, out.shape[-1])


def scored_logps(model: torch.nn.Module, batch: Batch, temperature: float = 1.0,
                 chunk_size: int = 1024) -> torch.Tensor:
    """(S,) log-probs of a batch's scored tokens under logits / temperature: token ``score_target[s]``, predicted at
    the flat position ``score_index[s]``, in at least fp32 (bf16 logits lose log-prob digits). With a plain LM head
    the head runs only on the scored positions, ``chunk_size`` rows at a time; otherwise the model's full logits."""
    return scored_logps_entropy(model, batch, temperature, chunk_size, entropy=False)[0]


def scored_logps_entropy(model: torch.nn.Module, batch: Batch, temperature: float = 1.0, chunk_size: int = 1024,
                         entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``scored_logps`` and, with ``entropy``, the (S,) entropy of the distribution each scored token was drawn
    from (detached; empty otherwise), from the same log-probs."""
    inner = unwrap(model)
    head = plain_head(inner)
    param = next(inner.parameters())
    src, tgt = batch["score_index"].to(param.device), batch["score_target"].to(param.device)
    up = torch.promote_types(param.dtype, torch.float32)
    if head is None:
        logits = pair_hidden(model, batch, decoder_only=False)[src].to(up)
        if temperature != 1.0:  # x / 1.0 is x: skipping it saves a (S x V) copy and changes no bit
            logits = logits / temperature
        logp = torch.log_softmax(logits, -1)
        with torch.no_grad():
            ent = row_entropy(logp) if entropy else logp.new_zeros(0)
        return logp.gather(1, tgt[:, None])[:, 0], ent
    return target_logps_entropy(pair_hidden(model, batch, decoder_only=True)[src], head.weight, tgt, chunk_size, up,
                                temperature, entropy)


def token_logps_entropy(model: torch.nn.Module, batch: Batch, temperature: float = 1.0,
                        chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """``token_logps`` and the (N, L) entropy of the sampling distribution at each completion token (detached)."""
    logp, ent = scored_logps_entropy(model, batch, temperature, chunk_size)
    return scatter_tokens(logp, batch), scatter_tokens(ent, batch)


def sequence_logps(model: torch.nn.Module, batch: Batch, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(2P,) summed log-probs and (2P,) counts of the scored (response) tokens of every sequence of a pair batch
    (``data.collate.collate_pairs``): chosen 2k, rejected 2k+1."""
    logp = scored_logps(model, batch, 1.0, chunk_size)
    seq = batch["score_seq"].to(logp.device)
    n_seq = 2 * int(batch["pair_index"].numel())
    sums = torch.zeros(n_seq, dtype=logp.dtype, device=logp.device).index_add(0, seq, logp)
    counts = torch.zeros(n_seq, dtype=torch.long, device=logp.device).index_add(0, seq, torch.ones_like(seq))
    return sums, counts


def token_logps(model: torch.nn.Module, batch: Batch, temperature: float = 1.0,
                chunk_size: int = 1024) -> torch.Tensor:
    """(N, L) log-probs of a rollout batch's sampled tokens under logits / temperature (the distribution they were
    sampled from), zero outside each completion."""
    return scatter_tokens(scored_logps(model, batch, temperature, chunk_size), batch)


def scatter_tokens(values: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Flat per-scored-token values -> (N, L), zero outside each completion."""
    mask = batch["completion_mask"]
    out = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    out[batch["score_seq"].to(values.device), batch["score_pos"].to(values.device)] = values
    return out
