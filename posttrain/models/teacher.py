"""The teacher of a distillation run: which of two kinds it is, and its outputs at a batch's scored positions.

- ``AdapterTeacher``: the student's own PEFT model with a second, frozen LoRA adapter (``teacher``) beside the
  student's (``default``). The teacher is the shared base with its adapter switched on: no second copy of the base
  weights. Its adapter never trains (requires_grad stays off) and is never saved as the student's (callers save
  ``selected_adapters=[STUDENT_ADAPTER]``).
- ``FrozenTeacher``: a model of its own, in eval mode with every weight frozen.

Both give ``active()``, a context in which the teacher runs (no autograd graph, no dropout). Distillation compares
two distributions over one vocabulary, so ``tokenizer_differences`` lists what would make the comparison
meaningless.

Layer 2 (models): imports torch, models.forward, models.lora.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from posttrain.models.forward import Batch, pair_hidden, plain_head
from posttrain.models.lora import fuse_lora_forward, unwrap

STUDENT_ADAPTER, TEACHER_ADAPTER = "default", "teacher"


class AdapterTeacher:
    """The teacher as adapter ``teacher`` on the student's base (see the module docstring)."""

    mode = "shared base"

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @contextlib.contextmanager
    def active(self) -> Iterator[torch.nn.Module]:
        """The model with the teacher's adapter on, in eval mode and without autograd; afterwards the student's
        adapter, the training flag and every parameter's requires_grad as they were (PEFT's set_adapter marks
        the adapter it switches to trainable)."""
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        was_training = self.model.training
        self.model.set_adapter(TEACHER_ADAPTER)
        self.model.eval()
        try:
            with torch.no_grad():
                yield self.model
        finally:
            self.model.set_adapter(STUDENT_ADAPTER)
            self.model.train(was_training)
            for p, flag in flags:
                p.requires_grad_(flag)

    def weight_bytes(self) -> int:
        """What the teacher adds to memory: its adapter's weights."""
        return sum(p.numel() * p.element_size() for n, p in self.model.named_parameters()
                   if f".{TEACHER_ADAPTER}." in n)


class FrozenTeacher:
    """A teacher model of its own, frozen."""

    mode = "separate model"

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval().requires_grad_(False)

    @contextlib.contextmanager
    def active(self) -> Iterator[torch.nn.Module]:
        with torch.no_grad():
            yield self.model

    def weight_bytes(self) -> int:
        seen: set[int] = set()
        total = 0
        for p in self.model.parameters():  # tied embeddings count once
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
        return total


Teacher = AdapterTeacher | FrozenTeacher


def attach_teacher_adapter(model: torch.nn.Module, adapter_dir: str) -> AdapterTeacher:
    """Load ``adapter_dir`` into the student's PEFT ``model`` as the frozen adapter ``teacher``; the student's
    adapter stays active and the trainable set stays what it was (the teacher's weights never train)."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.load_adapter(adapter_dir, adapter_name=TEACHER_ADAPTER, is_trainable=False)
    fuse_lora_forward(model)  # LoRA layers the teacher's adapter added take the same fast path
    model.set_adapter(STUDENT_ADAPTER)
    for n, p in model.named_parameters():
        p.requires_grad_(flags.get(n, False))
    return AdapterTeacher(model)


def scored_outputs(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the last hidden states at a batch's scored positions (S, H), the LM-head weight (V, H)) for a model whose
    logits are hidden @ W.T; otherwise (the logits there (S, V), None)."""
    head = plain_head(unwrap(model))
    out = pair_hidden(model, batch, decoder_only=head is not None)
    rows = out[batch["score_index"].to(out.device)]
    return (rows, head.weight) if head is not None else (rows, None)


def tokenizer_differences(student: Any, teacher: Any, *, template: bool) -> list[str]:
    """What differs between two tokenizers for a token-level comparison of their models: the vocabulary (token to
    id), the special tokens, and, when ``template`` (the prompts are rendered with the student's), the chat
    template. Empty when they agree."""
    out = []
    vs, vt = student.get_vocab(), teacher.get_vocab()
    if vs != vt:
        moved = sum(1 for tok, i in vs.items() if tok in vt and vt[tok] != i)
        out.append(f"vocabulary: {len(vs)} vs {len(vt)} tokens, {len(vs.keys() - vt.keys())} only in the student's, "
                   f"{len(vt.keys() - vs.keys())} only in the teacher's, {moved} with another id")
    for attr in ("eos_token", "bos_token", "pad_token", "unk_token"):
        a, b = getattr(student, attr, None), getattr(teacher, attr, None)
        if a != b:
            out.append(f"{attr}: {a!r} vs {b!r}")
    sa, sb = sorted(map(str, student.all_special_tokens)), sorted(map(str, teacher.all_special_tokens))
    if sa != sb:
        out.append(f"special tokens: {sorted(set(sa) - set(sb))} only in the student's, {sorted(set(sb) - set(sa))} "
                   "only in the teacher's")
    if template and getattr(student, "chat_template", None) != getattr(teacher, "chat_template", None):
        out.append("chat template: the teacher's renders prompts differently from the student's")
    return out
