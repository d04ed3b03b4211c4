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
    finished: list[bool]  # False: cut at max_new_tokens


def _prefilled_cache(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, n: int):
    """The KV cache of each left-padded prompt but its last token, run once and repeated for its ``n`` samples;
    generate then feeds only the last prompt token (it needs one uncached token to produce the first logits)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1], past_key_values=cache,
          use_cache=True)
    cache.batch_repeat_interleave(n)
    return cache


@torch.no_grad()
def sample_completions(model: torch.nn.Module, tokenizer, prompt_ids: list[list[int]], *, n: int,
                       max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                       batch_size: int = 16, min_new_tokens: int = 0) -> Rollout:
    """Sample ``n`` completions per prompt with a KV cache (transformers' generate), stopping at end of turn.

    A prompt goes through the model once for all its ``n`` samples (its cache is copied ``n`` times): with G = 8
    completions of ~100-token GSM8K prompts that removes most of the prefill. ``batch_size`` counts completions;
    a batch holds whole groups.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_token_ids(tokenizer, model)
    completions: list[list[int]] = []
    finished: list[bool] = []
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": None} if temperature > 0 \
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    per_batch = max(1, batch_size // n)
    with merged_for_generation(model):
        for k in range(0, len(prompt_ids), per_batch):
            chunk = prompt_ids[k:k + per_batch]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, p in enumerate(chunk):  # left padding: every prompt ends where decoding starts
                ids[i, width - len(p):] = torch.tensor(p)
                mask[i, width - len(p):] = 1
            ids, mask = ids.to(device), mask.to(device)
            cache = _prefilled_cache(model, ids, mask, n) if width > 1 else None
            out = model.generate(input_ids=ids.repeat_interleave(n, 0), attention_mask=mask.repeat_interleave(n, 0),
                                 past_key_values=cache, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                 eos_token_id=stops, pad_token_id=pad_id, **sampling)
            for row in out[:, width:].tolist():
                end = next((i for i, t in enumerate(row) if t in stops), None)
                completions.append(row[:end + 1] if end is not None else row)
                finished.append(end is not None)
    model.train(was_training)
    texts = [tokenizer.decode(c, skip_special_tokens=True).strip() for c in completions]
    return Rollout([p for p in prompt_ids for _ in range(n)], completions, texts, finished)
