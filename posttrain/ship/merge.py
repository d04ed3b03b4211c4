"""`posttrain merge`: W' = W + (alpha / r) B A into a standalone HF safetensors folder, checked against base +
adapter before and after it is saved and reloaded."""

from __future__ import annotations

import json
from typing import Any

from posttrain.io import atomic_dir, atomic_write_text
from posttrain.models import load_adapter, load_model
from posttrain.models.merge import compare
from posttrain.runs import init_adapter_of, resolve_adapter
from posttrain.ship.card import write_card
from posttrain.ship.checks import REPORTS, check_mergeable, check_out, merged_with_reference


def merge_run(adapter: str, out: str, *, model_name: str | None = None, dtype: str = "auto", device: str = "auto",
              prompts: list[str] | None = None, max_new_tokens: int = 32,
              workflow: dict[str, Any] | None = None) -> dict[str, Any]:
    """W' = W + (alpha / r) B A into a standalone HF safetensors folder, checked against base + adapter, with a
    model card (README.md; ``workflow``: a running workflow's state for it).

    A QLoRA adapter is merged into the de-quantized 4-bit base it was trained against; the report gives the logit
    error that introduces relative to the 4-bit base + adapter it replaces.
    """
    check_mergeable(adapter)
    dest = check_out(out, adapter)
    adapter_dir = resolve_adapter(adapter)
    m = merged_with_reference(adapter, model_name=model_name, dtype=dtype, device=device, prompts=prompts,
                              max_new_tokens=max_new_tokens)
    ref, stop, merged, tok = m.reference, m.stop_ids, m.merged, m.tokenizer
    in_memory = compare(merged, ref, max_new_tokens=max_new_tokens, stop_ids=stop)
    naive = None
    if m.quantization is not None:  # what merging into the original full-precision base would have given instead
        plain = load_adapter(load_model(m.base, dtype=dtype, device=device).model,
                             str(adapter_dir)).merge_and_unload()
        naive = compare(plain, ref, max_new_tokens=max_new_tokens, stop_ids=stop)
        del plain

    dest = atomic_dir(dest, lambda tmp: (merged.save_pretrained(tmp), tok.save_pretrained(tmp)))
    m.merged = merged = None  # free it before the reload check loads the saved copy
    reloaded = load_model(str(dest), dtype=dtype, device=device).model
    after_reload = compare(reloaded, ref, max_new_tokens=max_new_tokens, stop_ids=stop)
    report = {"adapter": str(adapter_dir), "base": m.base or "embedded", "init_adapter": init_adapter_of(adapter),
              "quantization": m.quantization.kind if m.quantization else None,
              "dtype": str(reloaded.dtype).removeprefix("torch."),
              "merged_vs_base_plus_adapter": in_memory, "reloaded_vs_base_plus_adapter": after_reload}
    if naive is not None:
        report["original_base_merged_vs_base_plus_adapter"] = naive
    atomic_write_text(dest / REPORTS[0], json.dumps(report, indent=2))
    write_card(dest, adapter, base=m.base, kind="merged", export=report, workflow=workflow)
    return report
