"""What every shipping command shares: the fixed check prompts, the output-folder rule, and base + adapter's
reference outputs beside the merged model they are compared with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain.data.render import has_chat_template, render_prompt
from posttrain.errors import ConfigError
from posttrain.models import Quantization
from posttrain.models.merge import ReferenceOutputs, reference_outputs
from posttrain.rollout.generate import stop_token_ids
from posttrain.runs import base_of, load_for_inference, resolve_adapter, run_config_of, run_quantization

REPORTS = ("merge_report.json", "export_report.json")
# Fixed, varied prompts: instructions, facts, code, arithmetic, a refusal-style request, a format request.
CHECK_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a hash table is.",
    "What is 17 times 23?",
    "Write a Python function that reverses a string.",
    "Give me three tips for a job interview.",
    "Reply in JSON with the keys name and age for Ada Lovelace, who died at 36.",
    "How do I pick a lock?",
]


def check_mergeable(adapter: str) -> None:
    method = run_config_of(adapter).get("method")
    if method in ("reward", "prm"):
        raise ConfigError(f"{adapter} is a {method} model (adapter + score head): it scores, it does not generate; "
                          "there is nothing to merge into a causal LM")


def check_out(out: str, adapter: str) -> Path:
    """The output folder is replaced as a whole, so it may only be new or an earlier merge/export output."""
    dest = Path(out)
    if dest.resolve() == Path(adapter).resolve() or dest.resolve() == resolve_adapter(adapter).resolve():
        raise ConfigError(f"--out {out} is the adapter being read; name a new folder")
    if dest.exists() and any(dest.iterdir()) and not any((dest / f).exists() for f in REPORTS):
        raise ConfigError(f"--out {out} exists and is not an earlier merge or export output; it would be replaced "
                          "as a whole, so name a new folder")
    return dest


def prompt_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    add_special = not has_chat_template(tokenizer, None)
    return [tokenizer(render_prompt(tokenizer, [{"role": "user", "content": p}]),
                      add_special_tokens=add_special)["input_ids"] for p in prompts]


@dataclass
class MergedWithReference:
    """The merged model, and what base + adapter (unmerged) answered on the check prompts before the merge."""
    merged: torch.nn.Module
    tokenizer: object
    reference: ReferenceOutputs
    stop_ids: list[int]
    base: str | None
    quantization: Quantization | None


def merged_with_reference(adapter: str, *, model_name: str | None, dtype: str, device: str,
                          prompts: list[str] | None, max_new_tokens: int) -> MergedWithReference:
    """Base + adapter run first on the check prompts; then the merge (a QLoRA adapter into the de-quantized 4-bit
    base it was trained against, which load_for_inference's merge path loads fresh)."""
    name = model_name or base_of(adapter)
    quant = run_quantization(adapter)
    reference = load_for_inference(name, adapter, dtype=dtype, device=device, merge=False)
    tok = reference.tokenizer
    stop = stop_token_ids(tok, reference.model)
    ref = reference_outputs(reference.model, prompt_ids(tok, prompts or CHECK_PROMPTS),
                            max_new_tokens=max_new_tokens, stop_ids=stop)
    if quant is None:
        merged = reference.model.merge_and_unload()
    else:
        del reference
        merged = load_for_inference(name, adapter, dtype=dtype, device=device).model
    return MergedWithReference(merged, tok, ref, stop, name, quant)
