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


def top1_along(got: torch.Tensor, want: torch.Tensor, prompt_len: int,
               continuation: list[int]) -> tuple[int, list[float]]:
    """Teacher-forced top-1 agreement along one reference continuation: at each position that predicts one of its
    tokens, does ``got``'s argmax name the reference's token? Returns the agreeing count and, for each position where
    it does not, the reference's own top-1 minus top-2 logit there (how near-tied the flipped token was)."""
    steps = slice(prompt_len - 1, prompt_len - 1 + len(continuation))
    target = torch.tensor(continuation)
    agree = got[steps].argmax(-1) == target
    top2 = want[steps].topk(2, dim=-1).values
    margins = (top2[:, 0] - top2[:, 1])[~agree]
    return int(agree.sum()), [float(x) for x in margins]


def compare(model: torch.nn.Module, ref: ReferenceOutputs, *, max_new_tokens: int, stop_ids: list[int]) -> dict:
    """Logit error along the reference's own token sequences, top-1 agreement along them (teacher-forced), and how
    many greedy continuations are identical.

    Whole-continuation identity compounds: one near-tied token that flips changes every token after it, so the
    count depends on how many near-ties a model's answers happen to hold. Teacher-forced agreement judges each
    position once, on the reference's own prefix, and is the number a quantization's tolerance can rest on."""
    model.eval()
    max_abs = mean_abs = 0.0
    positions = 0
    same = agree = scored = 0
    diverged: list[int] = []
    flipped: list[float] = []
    for i, (p, c, want) in enumerate(zip(ref.prompts, ref.continuations, ref.logits)):
        got = _logits(model, p + c)
        diff = (got - want).abs()
        max_abs = max(max_abs, float(diff.max()))
        mean_abs += float(diff.mean(dim=-1).sum())
        positions += diff.shape[0]
        ok, margins = top1_along(got, want, len(p), c)
        agree, scored, flipped = agree + ok, scored + len(c), flipped + margins
        if _greedy(model, p, max_new_tokens, stop_ids) == c:
            same += 1
        else:
            diverged.append(i)
    scale = max(float(t.abs().max()) for t in ref.logits)
    return {"max_abs_logit_diff": max_abs, "mean_abs_logit_diff": mean_abs / max(positions, 1),
            "reference_logit_scale": scale, "greedy_identical": same, "prompts": len(ref.prompts),
            "diverged_prompts": diverged, "top1_agreement": agree / max(scored, 1), "top1_positions": scored,
            "top1_flipped_max_margin": max(flipped, default=0.0)}


def lora_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA factors a PEFT model holds, keyed as PEFT saves them (no adapter name)."""
    out = {}
    for name, t in model.state_dict().items():
        if "lora_" in name:
            out[name.replace(".default", "")] = t.detach().cpu()
    return out
