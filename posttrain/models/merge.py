"""Checks that a merged model behaves like base + adapter, and that a saved adapter loads back as trained.

A merge is judged on the model's outputs, not trusted: the reference (base + adapter, unmerged) is run first on
fixed prompts; its greedy continuations and its logits along them are kept, and every later form of the model
(merged in memory, saved and reloaded) is compared with them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ReferenceOutputs:
    """Per prompt: the prompt ids, the reference's greedy continuation, and its logits over both, (T, V)."""
    prompts: list[list[int]]
    continuations: list[list[int]]
    logits: list[torch.Tensor]


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _greedy(model: torch.nn.Module, prompt: list[int], max_new_tokens: int, stop_ids: list[int]) -> list[int]:
    ids = torch.tensor([prompt], device=_device(model))
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, temperature=None, top_p=None, top_k=None, eos_token_id=stop_ids,
                         pad_token_id=stop_ids[0] if stop_ids else None)
    return out[0, len(prompt):].tolist()


@torch.no_grad()
def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    x = torch.tensor([ids], device=_device(model))
    return model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0].float().cpu()


def reference_outputs(model: torch.nn.Module, prompts: list[list[int]], *, max_new_tokens: int,
                      stop_ids: list[int]) -> ReferenceOutputs:
    model.eval()
    conts = [_greedy(model, p, max_new_tokens, stop_ids) for p in prompts]
    return ReferenceOutputs(prompts, conts, [_logits(model, p + c) for p, c in zip(prompts, conts)])


def compare(model: torch.nn.Module, ref: ReferenceOutputs, *, max_new_tokens: int, stop_ids: list[int]) -> dict:
    """Logit error along the reference's own token sequences, and how many greedy continuations are identical."""
    model.eval()
    max_abs = mean_abs = 0.0
    positions = 0
    same = 0
    diverged: list[int] = []
    for i, (p, c, want) in enumerate(zip(ref.prompts, ref.continuations, ref.logits)):
        diff = (_logits(model, p + c) - want).abs()
        max_abs = max(max_abs, float(diff.max()))
        mean_abs += float(diff.mean(dim=-1).sum())
        positions += diff.shape[0]
        if _greedy(model, p, max_new_tokens, stop_ids) == c:
            same += 1
        else:
            diverged.append(i)
    scale = max(float(t.abs().max()) for t in ref.logits)
    return {"max_abs_logit_diff": max_abs, "mean_abs_logit_diff": mean_abs / max(positions, 1),
            "reference_logit_scale": scale, "greedy_identical": same, "prompts": len(ref.prompts),
            "diverged_prompts": diverged}


def lora_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA factors a PEFT model holds, keyed as PEFT saves them (no adapter name)."""
    out = {}
    for name, t in model.state_dict().items():
        if "lora_" in name:
            out[name.replace(".default", "")] = t.detach().cpu()
    return out
