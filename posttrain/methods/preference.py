"""Direct preference optimisation (DPO, IPO, SimPO): per-sequence log-probs in one forward, a reference, a loss.

A batch from ``data.preference.collate_pairs`` lays every pair out as prompt | chosen | rejected (the prompt run
once) and lists the scored tokens with the position that predicts each; ``sequence_logps`` returns the summed
log-prob of each response, so even entries are chosen and odd ones rejected.

References, cheapest first: none (reference-free losses such as SimPO); precomputed (one pass before training,
stored on disk; training never runs the reference again); LoRA with the adapters disabled (the same weights,
no second copy); a frozen copy of the model (full fine-tuning).
"""

from __future__ import annotations

import copy
import hashlib
import io
from pathlib import Path
from typing import Callable, Protocol

import torch

from posttrain.io import atomic_write_bytes
from posttrain.losses import PREFERENCE_LOSSES, REFERENCE_FREE, PairLogps, PreferenceParams, target_logps
from posttrain.methods.sft import _plain_head, unwrap
from posttrain.models.attention import Layout, branch_segments, segment_lengths, uses_segments

Batch = dict[str, torch.Tensor]


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
    """Last hidden states (or logits, when not ``decoder_only``) of a pair batch, flattened to (B * T, -1)."""
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


def sequence_logps(model: torch.nn.Module, batch: Batch, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs and counts of the scored (response) tokens of every sequence: chosen 2k, rejected 2k+1."""
    inner = unwrap(model)
    head = _plain_head(inner)
    device = next(inner.parameters()).device
    src, tgt, seq = (batch[k].to(device) for k in ("score_index", "score_target", "score_seq"))
    up = torch.promote_types(next(inner.parameters()).dtype, torch.float32)  # bf16 logits lose log-prob digits
    if head is None:
        logits = pair_hidden(model, batch, decoder_only=False)[src]
        logp = torch.log_softmax(logits.to(up), -1).gather(1, tgt[:, None])[:, 0]
    else:  # the LM head only on scored positions, a chunk at a time
        logp = target_logps(pair_hidden(model, batch, decoder_only=True)[src], head.weight, tgt, chunk_size, up)
    n_seq = 2 * int(batch["pair_index"].numel())
    sums = torch.zeros(n_seq, dtype=logp.dtype, device=device).index_add(0, seq, logp)
    counts = torch.zeros(n_seq, dtype=torch.long, device=device).index_add(0, seq, torch.ones_like(seq))
    return sums, counts


class Reference(Protocol):
    def __call__(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor: ...


LogpsFn = Callable[[torch.nn.Module, Batch], torch.Tensor]


class AdapterOffReference:
    """The policy with its LoRA adapters disabled: the base weights it started from, no second copy. ``logps``
    says what to compute (default: per-sequence response log-probs; GRPO passes per-token ones)."""

    def __init__(self, chunk_size: int = 1024, logps: LogpsFn | None = None):
        self.logps = logps or (lambda m, b: sequence_logps(m, b, chunk_size)[0])

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        with model.disable_adapter():
            return self.logps(model, batch)


class FrozenCopyReference:
    """A frozen copy of the model taken before training (full fine-tuning changes the weights themselves)."""

    def __init__(self, model: torch.nn.Module, chunk_size: int = 1024, logps: LogpsFn | None = None):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.logps = logps or (lambda m, b: sequence_logps(m, b, chunk_size)[0])

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return self.logps(self.model, batch)


class PrecomputedReference:
    """Reference log-probs looked up by pair index: (pairs, 2) = (chosen, rejected) per pair."""

    def __init__(self, table: torch.Tensor):
        self.table = table

    def __call__(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        rows = self.table[batch["pair_index"]]
        return rows.reshape(-1).to(next(model.parameters()).device)


def fingerprint(batches: list[Batch]) -> str:
    h = hashlib.sha256()
    for b in batches:
        for key in ("input_ids", "score_target", "score_index", "pair_index"):
            h.update(b[key].numpy().tobytes())
    return h.hexdigest()[:16]


def precompute_reference(reference: Reference, model: torch.nn.Module, batches: list[Batch], n_pairs: int,
                         path: Path) -> PrecomputedReference:
    """One pass of ``reference`` over all pairs, cached at ``path`` (reused when the data is the same)."""
    key = fingerprint(batches)
    if path.exists():
        saved = torch.load(path, weights_only=True)
        if saved.get("fingerprint") == key:
            return PrecomputedReference(saved["table"])
    from rich.progress import Progress

    from posttrain.engine.logging import console

    table = torch.full((n_pairs, 2), float("nan"), dtype=torch.float64)
    was_training = model.training
    model.eval()
    with Progress(console=console, transient=True, disable=not console.is_terminal) as bar:
        for b in bar.track(batches, description=f"reference log-probs ({path.name})"):
            table[b["pair_index"]] = reference(model, b).double().cpu().reshape(-1, 2)
    model.train(was_training)
    if torch.isnan(table).any():
        raise RuntimeError("reference precomputation missed some pairs")
    buf = io.BytesIO()
    torch.save({"fingerprint": key, "table": table}, buf)
    atomic_write_bytes(path, buf.getvalue())
    return PrecomputedReference(table)


def pair_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """1 where chosen scores higher, 0 where lower, 0.5 on a tie: a model with no preference yet (the policy at
    step 0 equals its reference) is at chance, 50%, not at 0%."""
    return (chosen > rejected).double() + 0.5 * (chosen == rejected).double()


class Preference:
    """DPO-family method: ``loss`` names a function in losses.PREFERENCE_LOSSES; the loss unit is a pair."""

    def __init__(self, loss: str, params: PreferenceParams, reference: Reference | None, chunk_size: int = 1024):
        if loss not in PREFERENCE_LOSSES:
            raise ValueError(f"unknown preference loss {loss!r}; known: {', '.join(PREFERENCE_LOSSES)}")
        if reference is None and loss not in REFERENCE_FREE:
            raise ValueError(f"loss {loss!r} needs a reference")
        self.name, self.fn, self.params, self.reference, self.chunk_size = loss, PREFERENCE_LOSSES[loss], params, \
            reference, chunk_size

    def count(self, batch: Batch) -> int:
        return int(batch["pair_index"].numel())

    def pair_terms(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logp, n = sequence_logps(model, batch, self.chunk_size)
        ref = None if self.reference is None or self.name in REFERENCE_FREE else self.reference(model, batch)
        x = PairLogps(logp[0::2], logp[1::2], None if ref is None else ref[0::2].to(logp.dtype),
                      None if ref is None else ref[1::2].to(logp.dtype), n[0::2].to(logp.dtype),
                      n[1::2].to(logp.dtype))
        loss, chosen, rejected = self.fn(x, self.params)
        terms = {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margin": chosen - rejected,
                 "accuracy": pair_accuracy(chosen, rejected),
                 "logps/chosen": x.policy_chosen.detach(), "logps/rejected": x.policy_rejected.detach()}
        if ref is not None:
            terms["logps/ref_chosen"] = x.ref_chosen
            terms["logps/ref_rejected"] = x.ref_rejected
            # Per-token log-ratio on the data's responses: a KL(policy || reference) estimate off-policy.
            terms["kl_to_ref"] = ((x.policy_chosen.detach() - x.ref_chosen) + (x.policy_rejected.detach() -
                                   x.ref_rejected)) / (x.len_chosen + x.len_rejected)
        return loss, terms

    def loss_sum(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        loss, terms = self.pair_terms(model, batch)
        return loss.sum(), {k: float(v.mean()) for k, v in terms.items()}


@torch.no_grad()
def preference_eval(model: torch.nn.Module, method: Preference, batches: list[Batch],
                    prefix: str = "eval") -> dict[str, float]:
    """Held-out loss, preference accuracy (implicit reward margin > 0) and mean rewards, pair-weighted."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    n = 0
    for b in batches:
        loss, terms = method.pair_terms(model, b)
        n += loss.numel()
        for k, v in {"loss": loss, **terms}.items():
            sums[k] = sums.get(k, 0.0) + float(v.sum())
    model.train(was_training)
    return {f"{prefix}/{k}": v / max(n, 1) for k, v in sums.items()}

