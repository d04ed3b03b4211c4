"""Direct preference optimisation (DPO, IPO, SimPO, RPO): per-sequence log-probs in one forward, a reference, a loss.

A batch from ``data.collate.collate_pairs`` lays every pair out as prompt | chosen | rejected (the prompt run
once); ``models.forward.sequence_logps`` returns the summed log-prob of each response's tokens (the response only,
never the prompt) and its length, chosen at 2k and rejected at 2k+1. Per pair, with h = (log pi(y_w) -
log ref(y_w)) - (log pi(y_l) - log ref(y_l)) (``losses.preference``, the table ``PREFERENCE_LOSSES``):

  dpo:   -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)     (eps = label_smoothing, 0 by default)
  ipo:   (h - 1 / (2 beta))^2
  simpo: -log sigmoid(beta log pi(y_w) / |y_w| - beta log pi(y_l) / |y_l| - gamma)   (reference-free)
  rpo:   dpo - alpha log pi(y_w) / |y_w|

The loss unit is a pair: the loop divides the step's summed loss by its number of pairs (all ranks). Logged per
pair: implicit rewards beta (log pi(y) - log ref(y)) (SimPO: its length-normalised ones), their margin, accuracy
(1 if the chosen reward is higher, 0.5 on a tie), and a per-token KL(policy || reference) estimate on the data's
responses, (log pi(y_w) - log ref(y_w) + log pi(y_l) - log ref(y_l)) / (|y_w| + |y_l|).

References (``models.reference``), cheapest first: none (reference-free losses); precomputed (one pass before
training, stored on disk; training never runs the reference again); LoRA with the adapters disabled (the same
weights, no second copy); a frozen copy of the model (full fine-tuning).
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import torch

from posttrain.engine.logging import console
from posttrain.io import atomic_write_bytes
from posttrain.losses import PREFERENCE_LOSSES, PairLogps, PreferenceParams
from posttrain.models.forward import Batch, evaluating, sequence_logps
from posttrain.models.reference import PrecomputedReference, Reference


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


    table = torch.full((n_pairs, 2), float("nan"), dtype=torch.float64)
    with evaluating(model), Progress(console=console, transient=True, disable=not console.is_terminal) as bar:
        for b in bar.track(batches, description=f"reference log-probs ({path.name})"):
            table[b["pair_index"]] = reference(model, b).double().cpu().reshape(-1, 2)
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


class PreferenceMethod:
    """DPO-family method: ``loss`` names an entry of losses.PREFERENCE_LOSSES; the loss unit is a pair."""

    loss_parts = None  # one part: loss_sum (engine.loop.Method)

    def __init__(self, loss: str, params: PreferenceParams, reference: Reference | None, chunk_size: int = 1024):
        if loss not in PREFERENCE_LOSSES:
            raise ValueError(f"unknown preference loss {loss!r}; known: {', '.join(PREFERENCE_LOSSES)}")
        self.reference_free = PREFERENCE_LOSSES[loss].reference_free
        if reference is None and not self.reference_free:
            raise ValueError(f"loss {loss!r} needs a reference")
        self.name, self.fn, self.params, self.reference, self.chunk_size = loss, PREFERENCE_LOSSES[loss].fn, params, \
            reference, chunk_size

    def count(self, batch: Batch) -> int:
        return int(batch["pair_index"].numel())

    def pair_terms(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logp, n = sequence_logps(model, batch, self.chunk_size)
        ref = None if self.reference is None or self.reference_free else self.reference(model, batch)
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


def preference_eval(model: torch.nn.Module, method: PreferenceMethod, batches: list[Batch],
                    prefix: str = "eval") -> dict[str, float]:
    """Held-out loss, preference accuracy (implicit reward margin > 0) and mean rewards, pair-weighted."""
    sums: dict[str, float] = {}
    n = 0
    with evaluating(model):
        for b in batches:
            loss, terms = method.pair_terms(model, b)
            n += loss.numel()
            for k, v in {"loss": loss, **terms}.items():
                sums[k] = sums.get(k, 0.0) + float(v.sum())
    return {f"{prefix}/{k}": v / max(n, 1) for k, v in sums.items()}
