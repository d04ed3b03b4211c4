"""Sampling completions from the current policy for online RL.

With LoRA, the adapters are merged into the base weights for the duration of generation, so decoding runs plain
linear layers (no adapter side-matmuls per token); the base weights are restored exactly afterwards from a copy
(unmerging by subtraction would leave rounding drift in bf16 that grows with every step).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from posttrain.models.compile import eager
from posttrain.models.forward import evaluating
from posttrain.models.loading import pad_id as pad_id_of
from posttrain.models.quant import is_quantized
from posttrain.rollout.generate import stop_token_ids


@contextlib.contextmanager
def merged_for_generation(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Merge LoRA adapters in place for generation, then restore the exact base weights and unmerged state.

    A 4-bit base decodes with the adapters unmerged: merging would re-quantize W + BA.
    """
    if not hasattr(model, "merge_adapter") or is_quantized(model):
        yield model
        return
    saved = {name: m.base_layer.weight.detach().clone() for name, m in model.named_modules()
             if hasattr(m, "base_layer") and hasattr(m, "merge") and hasattr(m.base_layer, "weight")}
    model.merge_adapter()
    try:
        yield model
    finally:
        model.unmerge_adapter()
        modules = dict(model.named_modules())
        with torch.no_grad():
            for name, w in saved.items():
                modules[name].base_layer.weight.copy_(w)


@dataclass
class Rollout:
    """``n`` completions of each prompt, in prompt order (completions of prompt i are rows i*n .. i*n+n-1)."""
    prompt_ids: list[list[int]]  # one per completion
    completion_ids: list[list[int]]  # sampled tokens, ending with the stop token when the completion finished
    texts: list[str]
    finished: list[bool]  # True: ended by a stop token (finish reason "stop"); False: cut at max_new_tokens ("length")
    # The sampling engine's log-prob of each sampled token under softmax(logits / temperature), as the trainer
    # scores it (no top-p cut, no min_new_tokens mask); the raw distribution at temperature 0 (greedy).
    logprobs: list[list[float]]
    version: int = 0  # the policy version (rollout engine sync) the completions were sampled from


def _prefilled_cache(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor):
    """The KV cache of each left-padded prompt but its last token, run once per prompt (``_static_cache`` repeats
    it for the prompt's samples); decoding starts by feeding the last prompt token."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1], past_key_values=cache,
          use_cache=True)
    return cache


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """``probs`` (..., V) with everything outside each row's top-p nucleus zeroed: the most probable tokens until
    their mass reaches ``top_p``, the token that crosses it included (not renormalised)."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs * keep)


def draw(logits: torch.Tensor, temperature: float, top_p: float = 1.0,
         uniform: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of (B, V) logits: argmax at temperature 0, else a draw from softmax(logits / temperature)
    cut to its top-p nucleus (the token that crosses ``top_p`` included).

    Drawn by inverting the cumulative distribution with one uniform number per row (``uniform`` (B,), else from the
    global generator). ``torch.multinomial`` (what ``generate`` uses) draws an exponential variate for every
    vocabulary entry of every row: 16 x 49k of them, ~18 ms of a ~150 ms decode step on the 2-core CPU."""
    if temperature == 0:
        return logits.argmax(-1)
    cdf = nucleus(torch.softmax(logits.float() / temperature, dim=-1), top_p).cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, device=cdf.device) if uniform is None else uniform.reshape(-1, 1).to(cdf.device)
    u = u * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp_(max=cdf.shape[1] - 1)


def row_generators(seeds: list[int], n: int) -> list[torch.Generator]:
    """One generator per completion: sample j of the prompt seeded ``seed`` draws from (seed, j) alone, so a
    completion does not depend on which other prompts share its batch, its process, or its position."""
    return [torch.Generator().manual_seed((seed * 65_537 + j) % 2 ** 63) for seed in seeds for j in range(n)]


def token_logprob(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B,) float32 log-prob of ``tokens`` under softmax(logits / temperature) (temperature 0: the raw logits'), the
    distribution the trainer scores a completion under (``models.forward.token_logps``)."""
    scaled = logits.float() / (temperature or 1.0)
    return scaled.gather(-1, tokens[:, None])[:, 0] - torch.logsumexp(scaled, dim=-1)


def _static_cache(model: torch.nn.Module, prefilled, n: int, length: int):
    """A preallocated cache of ``length`` positions holding ``prefilled``'s prompts, each repeated ``n`` times.
    Decoding then writes one position per step in place; a growing cache concatenates every layer's keys and
    values at every step (~20% of a decode step on the 2-core CPU)."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=length)
    if prefilled is not None:
        for i, layer in enumerate(prefilled.layers):
            cache.update(layer.keys.repeat_interleave(n, 0), layer.values.repeat_interleave(n, 0), i)
    return cache


def _decode(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, prefilled, n: int, *, max_new_tokens: int,
            min_new_tokens: int, stops: list[int], pad_id: int, temperature: float, top_p: float,
            generators: list[torch.Generator] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B * n, <= max_new_tokens) new tokens for ``n`` samples of each left-padded prompt, ``pad_id`` after a row's
    stop token, and each token's ``token_logprob`` (taken before the min_new_tokens mask); ``prefilled`` caches every
    prompt token but the last, once per prompt (None for one-token prompts)."""
    rows, width = ids.shape[0] * n, ids.shape[1]
    cache = _static_cache(model, prefilled, n, width + max_new_tokens)
    attn = torch.zeros(rows, width + max_new_tokens, dtype=mask.dtype, device=mask.device)
    attn[:, :width] = mask.repeat_interleave(n, 0)
    pos = attn.sum(-1, keepdim=True) - 1
    cur = ids[:, -1:].repeat_interleave(n, 0)
    stop = torch.tensor(stops, dtype=torch.long, device=ids.device)
    alive = torch.ones(rows, dtype=torch.bool, device=ids.device)
    out, logps = [], []
    for t in range(max_new_tokens):
        logits = model(input_ids=cur, attention_mask=attn, position_ids=pos, past_key_values=cache,
                       use_cache=True).logits[:, -1]
        raw = logits.clone() if t < min_new_tokens else logits
        if t < min_new_tokens:
            logits[:, stop] = float("-inf")
        uniform = None if generators is None else torch.cat([torch.rand(1, generator=g) for g in generators])
        tok = torch.where(alive, draw(logits, temperature, top_p, uniform), pad_id)
        out.append(tok)
        logps.append(token_logprob(raw, tok, temperature))
        alive &= ~torch.isin(tok, stop)
        if not bool(alive.any()):
            break
        cur, pos = tok[:, None], pos + 1
        attn[:, width + t] = 1
    if not out:
        return ids.new_zeros(rows, 0), torch.zeros(rows, 0)
    return torch.stack(out, dim=1), torch.stack(logps, dim=1)


@torch.no_grad()
def sample_completions(model: torch.nn.Module, tokenizer, prompt_ids: list[list[int]], *, n: int,
                       max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                       batch_size: int = 16, min_new_tokens: int = 0, seeds: list[int] | None = None) -> Rollout:
    """Sample ``n`` completions per prompt with a KV cache, stopping at end of turn. With ``seeds`` (one per
    prompt), each completion draws from its own generator (``row_generators``); without, from the global one.

    A prompt goes through the model once for all its ``n`` samples (its cache is copied ``n`` times): with G = 8
    completions of ~100-token GSM8K prompts that removes most of the prefill. ``batch_size`` counts completions;
    a batch holds whole groups.
    """
    device = next(model.parameters()).device
    pad_id = pad_id_of(tokenizer)
    stops = stop_token_ids(tokenizer, model)
    completions: list[list[int]] = []
    logprobs: list[list[float]] = []
    finished: list[bool] = []
    per_batch = max(1, batch_size // n)
    if seeds is not None and len(seeds) != len(prompt_ids):
        raise ValueError(f"{len(seeds)} seeds for {len(prompt_ids)} prompts")
    with evaluating(model), merged_for_generation(model), eager():
        for k in range(0, len(prompt_ids), per_batch):
            chunk = prompt_ids[k:k + per_batch]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, p in enumerate(chunk):  # left padding: every prompt ends where decoding starts
                ids[i, width - len(p):] = torch.tensor(p)
                mask[i, width - len(p):] = 1
            ids, mask = ids.to(device), mask.to(device)
            cache = _prefilled_cache(model, ids, mask) if width > 1 else None
            out, logps = _decode(model, ids, mask, cache, n, max_new_tokens=max_new_tokens,
                                 min_new_tokens=min_new_tokens, stops=stops, pad_id=pad_id, temperature=temperature,
                                 top_p=top_p,
                                 generators=None if seeds is None else row_generators(seeds[k:k + per_batch], n))
            for row, row_logps in zip(out.tolist(), logps.tolist()):
                end = next((i for i, t in enumerate(row) if t in stops), None)
                length = end + 1 if end is not None else len(row)
                completions.append(row[:length])
                logprobs.append(row_logps[:length])
                finished.append(end is not None)
    texts = [tokenizer.decode(c, skip_special_tokens=True).strip() for c in completions]
    return Rollout([p for p in prompt_ids for _ in range(n)], completions, texts, finished, logprobs)
