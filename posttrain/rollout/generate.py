"""Batched text generation from chat messages (KV cache through transformers' generate)."""

from __future__ import annotations

import torch

from posttrain.data.formats import Messages
from posttrain.data.render import has_chat_template, render_prompt
from posttrain.data.tool_rows import Tools
from posttrain.models.compile import eager
from posttrain.models.forward import evaluating
from posttrain.models.loading import pad_id as pad_id_of


def stop_token_ids(tokenizer, model) -> list[int]:
    ids = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for v in (tokenizer.eos_token_id, gen_eos):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(v)
    return sorted(ids)


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer, chats: list[Messages], *, max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 8,
             chat_template: str | None = None, seed: int | None = None,
             tools: list[Tools | None] | None = None) -> list[str]:
    """Complete each chat with one assistant turn; temperature 0 means greedy decoding. ``tools``: per chat, the
    functions offered to it (as in training), or None."""
    device = next(model.parameters()).device
    pad_id = pad_id_of(tokenizer)
    offered = tools if tools is not None else [None] * len(chats)
    texts = [render_prompt(tokenizer, chat, chat_template, t) for chat, t in zip(chats, offered, strict=True)]
    outputs: list[str] = []
    # A chat template carries its own special tokens; plain prompts get the tokenizer's (e.g. BOS).
    add_special = not has_chat_template(tokenizer, chat_template)
    if seed is not None:
        torch.manual_seed(seed)
    with evaluating(model):
        for k in range(0, len(texts), batch_size):
            enc = [tokenizer(t, add_special_tokens=add_special)["input_ids"] for t in texts[k:k + batch_size]]
            width = max(len(e) for e in enc)
            ids = torch.full((len(enc), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(enc), width), dtype=torch.long)
            for i, e in enumerate(enc):  # left padding keeps every prompt's end aligned for decoding
                ids[i, width - len(e):] = torch.tensor(e)
                mask[i, width - len(e):] = 1
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
                {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
            with eager():
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     max_new_tokens=max_new_tokens, eos_token_id=stop_token_ids(tokenizer, model),
                                     pad_token_id=pad_id, **sampling)
            for row in out[:, width:]:
                outputs.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return outputs
