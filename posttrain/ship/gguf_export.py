"""`posttrain export --format gguf`: the merged model as one GGUF file (for llama.cpp, Ollama, LM Studio), not
trusted until it has been read back.

The file is loaded through transformers' GGUF loader (which de-quantizes it) and, where llama-cpp-python is
installed, through llama.cpp itself; both are compared with base + adapter on the fixed check prompts: max and
mean |logit diff| and top-1 agreement along the reference's own tokens, greedy continuations, and the tokenizer's
ids and chat template. The quantization's tolerance (models/gguf_write.QUANTS) decides ``within_tolerance``; the
CLI exits 1 when it is not met. The .gguf and export_report.json land together in one atomic folder write.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import torch

from posttrain.io import atomic_dir
from posttrain.models import load_tokenizer, resolve_model_path
from posttrain.models.gguf_write import GGUFQuant, check_exportable, pre_tokenizer_name, quant_of, write_gguf
from posttrain.models.merge import ReferenceOutputs, compare
from posttrain.runs import base_of, init_adapter_of, resolve_adapter
from posttrain.ship.card import hub_name, write_card
from posttrain.ship.checks import CHECK_PROMPTS, REPORTS, check_mergeable, check_out, merged_with_reference, prompt_ids


def load_gguf(folder: Path, file: str, dtype: torch.dtype, device: torch.device):
    """The GGUF file as a transformers model and tokenizer, the way a user of transformers would read it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    return model.to(device=device, dtype=dtype).eval(), AutoTokenizer.from_pretrained(folder, gguf_file=file)


def tokenizer_round_trip(original, loaded, prompts: list[str]) -> dict[str, Any]:
    """Does the tokenizer read back from the file encode the check prompts (chat-rendered) to the same ids, carry
    the same chat template and the same special tokens?"""
    want, got = prompt_ids(original, prompts), prompt_ids(loaded, prompts)
    special = {k: [getattr(original, k), getattr(loaded, k)] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return {"ids_identical": sum(a == b for a, b in zip(want, got)), "prompts": len(prompts),
            "differing_prompts": [i for i, (a, b) in enumerate(zip(want, got)) if a != b],
            "chat_template_identical": original.chat_template == loaded.chat_template,
            "special_token_ids": special,
            "special_tokens_identical": all(a == b for a, b in special.values())}


def llama_cpp_greedy(path: Path, ref: ReferenceOutputs, *, max_new_tokens: int, stop_ids: list[int]) -> dict:
    """Greedy continuations through llama.cpp's own runtime (llama-cpp-python), compared with the reference's."""
    from llama_cpp import Llama

    n_ctx = max(len(p) + len(c) for p, c in zip(ref.prompts, ref.continuations)) + max_new_tokens + 8
    llm = Llama(model_path=str(path), n_ctx=n_ctx, verbose=False)
    same, diverged = 0, []
    for i, (prompt, want) in enumerate(zip(ref.prompts, ref.continuations)):
        out: list[int] = []
        for tok in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            out.append(int(tok))  # HF's generate keeps the stop token in its continuation; so does this
            if tok in stop_ids or len(out) == max_new_tokens:
                break
        same += out == want
        if out != want:
            diverged.append(i)
    return {"greedy_identical": same, "prompts": len(ref.prompts), "diverged_prompts": diverged}


def verdict(spec: GGUFQuant, check: dict, tokens: dict, llama_cpp: dict | None) -> tuple[bool, list[str]]:
    """Within the quantization's tolerance? The reasons it is not, in words."""
    need = math.ceil(spec.min_greedy_identical * check["prompts"])
    why = []
    if check["greedy_identical"] < need:
        why.append(f"greedy continuations identical on {check['greedy_identical']}/{check['prompts']} prompts; "
                   f"this quantization's tolerance is at least {need}")
    if check["top1_agreement"] < spec.min_top1_agreement:
        why.append(f"top-1 tokens along the reference's answers agree at {check['top1_agreement']:.2%} of "
                   f"{check['top1_positions']} positions; this quantization's tolerance is at least "
                   f"{spec.min_top1_agreement:.2%}")
    if check["mean_abs_logit_diff"] > spec.max_mean_logit_diff:
        why.append(f"mean |logit diff| {check['mean_abs_logit_diff']:.3g} > tolerance {spec.max_mean_logit_diff}")
    if llama_cpp is not None and llama_cpp["greedy_identical"] < need:
        why.append(f"llama.cpp's greedy continuations identical on {llama_cpp['greedy_identical']}/"
                   f"{llama_cpp['prompts']} prompts; at least {need} expected")
    if tokens["ids_identical"] < tokens["prompts"]:
        why.append(f"the file's tokenizer encodes prompts {tokens['differing_prompts']} differently")
    if not tokens["chat_template_identical"]:
        why.append("the file's chat template differs from the tokenizer's")
    if not tokens["special_tokens_identical"]:
        why.append(f"special token ids differ (original, file): {tokens['special_token_ids']}")
    return not why, why


def warnings_of(check: dict) -> list[str]:
    """What a user should know even when the file is within its tolerance."""
    if check["greedy_identical"] == check["prompts"]:
        return []
    return [f"greedy answers differ from base+adapter on prompts {check['diverged_prompts']} "
            f"({check['prompts'] - check['greedy_identical']} of {check['prompts']}); teacher-forced, "
            f"{check['top1_agreement']:.2%} of their tokens agree, and where one flips the reference led its runner-up "
            f"by at most {check['top1_flipped_max_margin']:.2g} logits; one flip changes every token after it"]


def export_gguf(adapter: str, out: str, *, quant: str = "f16", model_name: str | None = None, dtype: str = "auto",
                device: str = "auto", prompts: list[str] | None = None, max_new_tokens: int = 32,
                workflow: dict[str, Any] | None = None) -> dict[str, Any]:
    """Merge ``adapter`` into its base, write ``model-<quant>.gguf`` into ``out``, read it back and check it; a model
    card (README.md; ``workflow``: a running workflow's state for it) goes beside it."""
    from transformers import AutoConfig

    spec = quant_of(quant)  # refusals before the model is loaded and run
    check_mergeable(adapter)
    dest = check_out(out, adapter)
    base = model_name or base_of(adapter)
    check_exportable(AutoConfig.from_pretrained(resolve_model_path(base)))
    pre_tokenizer_name(load_tokenizer(base))
    m = merged_with_reference(adapter, model_name=base, dtype=dtype, device=device, prompts=prompts,
                              max_new_tokens=max_new_tokens)
    param = next(m.merged.parameters())
    file = f"model-{quant.lower()}.gguf"

    def write(tmp: Path) -> None:
        stored = write_gguf(m.merged, m.tokenizer, tmp / file, quant, name=Path(hub_name(m.base)).name)
        m.merged = None  # free the merged weights before the file is loaded back
        loaded, loaded_tok = load_gguf(tmp, file, param.dtype, param.device)
        check = compare(loaded, m.reference, max_new_tokens=max_new_tokens, stop_ids=m.stop_ids)
        del loaded
        tokens = tokenizer_round_trip(m.tokenizer, loaded_tok, prompts or CHECK_PROMPTS)
        through_llama_cpp = None
        if importlib.util.find_spec("llama_cpp") is not None:
            through_llama_cpp = llama_cpp_greedy(tmp / file, m.reference, max_new_tokens=max_new_tokens,
                                                 stop_ids=m.stop_ids)
        ok, why = verdict(spec, check, tokens, through_llama_cpp)
        report.update({
            "adapter": str(resolve_adapter(adapter)), "base": m.base or "embedded", "format": "gguf",
            "init_adapter": init_adapter_of(adapter),
            "quantization": m.quantization.kind if m.quantization else None, **stored,
            "tolerance": {"min_greedy_identical": math.ceil(spec.min_greedy_identical * check["prompts"]),
                          "min_top1_agreement": spec.min_top1_agreement,
                          "max_mean_logit_diff": spec.max_mean_logit_diff, "measured": spec.measured},
            "gguf_vs_base_plus_adapter": check, "tokenizer": tokens, "llama_cpp": through_llama_cpp,
            "within_tolerance": ok, "failures": why, "warnings": [] if why else warnings_of(check)})
        (tmp / REPORTS[1]).write_text(json.dumps(report, indent=2))
        write_card(tmp, adapter, base=m.base, kind="gguf", export=report, workflow=workflow)

    report: dict[str, Any] = {}
    atomic_dir(dest, write)
    return report

