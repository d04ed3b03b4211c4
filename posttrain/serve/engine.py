"""Batched decoding over one base model and many LoRA adapters: every step is one forward for all rows.

Rows for different adapters share a forward through PEFT's mixed-adapter batches (``adapter_names``, one per
row; ``BASE`` for rows without an adapter), so ten adapters cost one pass over the base weights per step, not
ten. Prompts are left-padded, which keeps every row's next token in the last column. A request that arrives
while a batch is running joins it between steps: its prompt is prefilled alone, then the narrower of the two KV
caches is left-padded to the other's width. Padding columns are masked, so a row's tokens do not depend on
its neighbours (up to float rounding).

Rows that ask for logprobs get them from the same logits they are sampled from (serve/logprobs.py); the others pay
nothing for it. min_tokens masks the stop tokens in a row's logits until it has that many tokens.

Not thread-safe: one scheduler thread owns an Engine (see scheduler.py).
"""

from __future__ import annotations

import itertools
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain.models.loading import pad_id as pad_id_of
from posttrain.serve import logprobs
from posttrain.serve.api import ServeError
from posttrain.serve.text import TextStream, sample_token

log = logging.getLogger("posttrain.serve")

BASE = "__base__"  # PEFT's row marker for "no adapter" (peft/tuners/lora/layer.py, _mixed_batch_forward)
_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # the names PEFT loads from a local folder
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


@dataclass(frozen=True)
class Adapter:
    name: str  # what requests put in "model"
    key: str  # PEFT's adapter name: public names may hold characters a module key cannot ('.')
    path: str


def stop_ids(tokenizer, model) -> set[int]:
    """EOS (tokenizer's and generation config's) and the end-of-turn tokens this vocabulary has."""
    ids = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for v in (tokenizer.eos_token_id, gen_eos):
        ids.update([v] if isinstance(v, int) else v or [])
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in _END_OF_TURN if t in vocab)
    return ids


class Row:
    """One sequence being decoded, and the request that receives its text."""

    def __init__(self, request, key: str, tokenizer):
        s = request.sampling
        self.request, self.key, self.sampling = request, key, s
        self.prompt: list[int] = request.prompt_ids
        self.text = TextStream(tokenizer, s.stop)
        self.generator = torch.Generator().manual_seed(s.seed if s.seed is not None else random.getrandbits(63))
        self.tokens: list[int] = []  # every sampled id, the stop token included
        self.steps: list[logprobs.Step] | None = [] if s.logprobs is not None else None
        self.num_generated = 0
        self.last: int | None = None
        self.done = False


class Engine:
    def __init__(self, model: torch.nn.Module, tokenizer, *, base_path: str = "", logprobs_mode: str = logprobs.RAW):
        if logprobs_mode not in logprobs.MODES:
            raise ValueError(f"logprobs_mode must be one of {', '.join(logprobs.MODES)}, got {logprobs_mode!r}")
        self.logprobs_mode = logprobs_mode
        self.base = model.eval()
        self.peft = None  # a PeftModel around self.base while at least one adapter is loaded
        self.tokenizer, self.base_path = tokenizer, base_path
        self.device = next(model.parameters()).device
        self.adapters: dict[str, Adapter] = {}  # replaced on change, never mutated: handler threads read it bare
        self.max_len: int | None = getattr(model.config, "max_position_embeddings", None)
        self.eos = stop_ids(tokenizer, model)
        self._eos_index = torch.tensor(sorted(self.eos), dtype=torch.long, device=self.device)
        # Ids a prompt may hold: the tokenizer must decode them and the embedding must have a row for them.
        self.vocab_size = min(len(tokenizer), model.get_input_embeddings().num_embeddings)
        self.pad_id = pad_id_of(tokenizer)
        self._keys = itertools.count()
        self.rows: list[Row] = []
        self.cache = None
        self.mask: torch.Tensor | None = None  # (B, T) 1 on real tokens, 0 on left padding
        self.can_join = True  # False for caches that are not plain per-layer K/V (sliding windows): no joining
        self.stats = {"forwards": 0, "max_rows": 0, "max_adapters": 0, "tokens": 0}

    # ---- adapters (called between steps only) ----

    def load_adapter(self, name: str, folder: Path) -> Adapter:
        from peft import LoraConfig, get_peft_model

        if name in self.adapters:
            raise ServeError(409, f"an adapter named {name!r} is already loaded; unload it first", param="lora_name")
        try:
            meta = json.loads((folder / "adapter_config.json").read_text())
        except (OSError, ValueError) as exc:
            raise ServeError(400, f"cannot read {folder / 'adapter_config.json'}: {exc}", param="lora_path") from exc
        if meta.get("peft_type") != "LORA":
            raise ServeError(400, f"{folder} holds a {meta.get('peft_type')} adapter; only LoRA adapters can share "
                                  "a batch", param="lora_path")
        # Without a local weights file PEFT takes the folder for a Hub repo id and fails on its name instead.
        if not any((folder / f).is_file() for f in _WEIGHTS):
            raise ServeError(400, f"adapter weights file missing: {folder} has adapter_config.json but neither "
                                  f"{' nor '.join(_WEIGHTS)}", param="lora_path")
        key = f"lora{next(self._keys)}"
        fresh = self.peft is None
        try:
            if fresh:
                cfg = LoraConfig.from_pretrained(str(folder))
                cfg.inference_mode = True
                self.peft = get_peft_model(self.base, cfg, adapter_name=key)
            result = self.peft.load_adapter(str(folder), adapter_name=key, torch_device=str(self.device))
            # PEFT only warns when adapter weights find no place in the model; a served adapter that silently
            # behaves like the base is worse than a refusal.
            missing = [k for k in result.missing_keys if f".{key}." in k]
            if missing or result.unexpected_keys:
                raise ValueError(f"weights missing from the file: {missing[:3]}; weights the base has no place "
                                 f"for: {list(result.unexpected_keys)[:3]}")
        except Exception as exc:
            self._discard(key, fresh)
            msg = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc))
            base = f" {self.base_path}" if self.base_path else ""
            raise ServeError(400, f"adapter {name!r} ({folder}) does not fit the base model{base}: "
                                  f"{msg.replace(f'.{key}.', '.')}", param="lora_path") from exc
        self.peft.eval()  # new LoRA modules start in training mode (dropout on; PEFT refuses adapter_names)
        adapter = Adapter(name=name, key=key, path=str(folder))
        self.adapters = {**self.adapters, name: adapter}
        return adapter

    def unload_adapter(self, name: str) -> None:
        adapter = self.adapters.get(name)
        if adapter is None:
            raise ServeError(404, f"no adapter named {name!r} is loaded", param="lora_name", code="model_not_found")
        busy = sum(r.key == adapter.key for r in self.rows)
        if busy:
            raise ServeError(409, f"adapter {name!r} is generating for {busy} request(s); retry when they finish",
                             param="lora_name")
        if len(self.adapters) == 1:
            self.base, self.peft = self.peft.unload(), None  # PEFT cannot run with zero adapters: drop its layers
        else:
            self.peft.delete_adapter(adapter.key)
        self.adapters = {k: v for k, v in self.adapters.items() if k != name}

    def _discard(self, key: str, fresh: bool) -> None:
        if self.peft is None:
            return
        if fresh:
            self.base, self.peft = self.peft.unload(), None
        elif key in self.peft.peft_config:
            self.peft.delete_adapter(key)

    def key_of(self, model: str, served_name: str) -> str | None:
        if model == served_name:
            return BASE
        adapter = self.adapters.get(model)
        return adapter.key if adapter else None

    # ---- decoding ----

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, keys: list[str],
                 cache) -> torch.Tensor:
        """Last-position logits ``(B, V)`` float32 of one forward with each row's adapter."""
        kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                      use_cache=True, logits_to_keep=1)
        if self.peft is None:
            out = self.base(**kwargs)
        else:
            out = self.peft(**kwargs, adapter_names=keys)
        self.stats["forwards"] += 1
        self.stats["max_rows"] = max(self.stats["max_rows"], len(keys))
        self.stats["max_adapters"] = max(self.stats["max_adapters"], len(set(keys)))
        return out.logits[:, -1].float()

    def prefill(self, prompts: list[list[int]], keys: list[str]):
        """Run left-padded prompts once: returns (last-position logits (B, V), their KV cache, mask (B, T))."""
        from transformers import DynamicCache

        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.base.config)
        logits = self._forward(ids, mask, positions, keys, cache)
        return logits, cache, mask

    def add(self, requests: list, served_name: str) -> None:
        """Admit requests: prefill them together, join them to the running batch, take their first token."""
        rows = []
        for req in requests:
            key = self.key_of(req.model, served_name)
            if key is None:  # unloaded while the request waited in the queue
                req.emit("error", status=404, message=f"model {req.model!r} is not loaded")
            else:
                rows.append(Row(req, key, self.tokenizer))
        if not rows:
            return
        logits, cache, mask = self.prefill([r.prompt for r in rows], [r.key for r in rows])
        self._join(rows, cache, mask)
        self._advance(rows, logits)
        self._drop_finished()

    def step(self) -> None:
        """One token for every running row."""
        for r in self.rows:
            if r.request.cancelled and not r.done:
                r.done = True
        self._drop_finished()
        if not self.rows:
            return
        ids = torch.tensor([[r.last] for r in self.rows], device=self.device)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        positions = self.mask.sum(-1, keepdim=True) - 1
        logits = self._forward(ids, self.mask, positions, [r.key for r in self.rows], self.cache)
        self._advance(self.rows, logits)
        self._drop_finished()

    def fail_all(self, status: int, message: str) -> None:
        for r in self.rows:
            if not r.done:
                r.request.emit("error", status=status, message=message)
        self.rows, self.cache, self.mask = [], None, None

    def _join(self, rows: list[Row], cache, mask: torch.Tensor) -> None:
        if not self.rows:
            self.rows, self.cache, self.mask = rows, cache, mask
            self.can_join = all(type(layer).__name__ == "DynamicLayer" for layer in cache.layers)
            return
        width = max(self.mask.shape[1], mask.shape[1])

        def pad(t: torch.Tensor) -> torch.Tensor:  # left-pad the sequence axis (-2 for K/V, -1 for masks)
            dim = -1 if t.dim() == 2 else -2
            extra = width - t.shape[dim]
            if extra == 0:
                return t
            shape = list(t.shape)
            shape[dim] = extra
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        for old, new in zip(self.cache.layers, cache.layers):
            old.keys = torch.cat([pad(old.keys), pad(new.keys)], dim=0)
            old.values = torch.cat([pad(old.values), pad(new.values)], dim=0)
        self.mask = torch.cat([pad(self.mask), pad(mask)], dim=0)
        self.rows = self.rows + rows

    def _advance(self, rows: list[Row], logits: torch.Tensor) -> None:
        # A log_softmax over the vocabulary per row and step costs time: only for the rows that asked.
        want = [i for i, r in enumerate(rows) if r.steps is not None]
        temps = [rows[i].sampling.temperature for i in want]
        raw = logprobs.distribution(logits[want], temps, logprobs.RAW) \
            if want and self.logprobs_mode == logprobs.RAW else None
        self._hold_stop_tokens(rows, logits)
        tokens = [sample_token(row_logits, temperature=r.sampling.temperature, top_p=r.sampling.top_p,
                               generator=r.generator) for r, row_logits in zip(rows, logits)]
        if want:
            logp = raw if raw is not None else logprobs.distribution(logits[want], temps, logprobs.PROCESSED)
            picked = logprobs.steps(logp, [tokens[i] for i in want], [rows[i].sampling.logprobs for i in want])
            for i, step in zip(want, picked):
                rows[i].steps.append(step)
        for row, token in zip(rows, tokens):
            self._push(row, token)

    def _hold_stop_tokens(self, rows: list[Row], logits: torch.Tensor) -> None:
        """min_tokens: the stop tokens cannot be sampled by a row that has fewer tokens than it asked for."""
        for i, r in enumerate(rows):
            if r.num_generated < r.sampling.min_tokens:
                held = self._eos_index if not r.sampling.stop_token_ids else \
                    torch.tensor(sorted(self.eos | set(r.sampling.stop_token_ids)), device=logits.device)
                logits[i, held] = float("-inf")

    def _push(self, row: Row, token: int) -> None:
        row.num_generated += 1
        row.tokens.append(token)
        row.last = token
        self.stats["tokens"] += 1
        if token in self.eos or token in row.sampling.stop_token_ids:
            return self._finish(row, "stop")
        piece, stopped = row.text.push(token)
        if piece:
            row.request.emit("text", text=piece)
        if stopped:
            self._finish(row, "stop")
        elif row.num_generated >= row.sampling.max_tokens:
            self._finish(row, "length")

    def _finish(self, row: Row, reason: str) -> None:
        piece = row.text.flush()
        if piece:
            row.request.emit("text", text=piece)
        row.request.emit("done", finish_reason=reason, prompt_tokens=len(row.prompt),
                         completion_tokens=row.num_generated, token_ids=row.tokens, logprobs=row.steps)
        row.done = True

    def _drop_finished(self) -> None:
        keep = [i for i, r in enumerate(self.rows) if not r.done]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache, self.mask = [], None, None
            return
        index = torch.tensor(keep, device=self.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        self.rows = [self.rows[i] for i in keep]
        # Columns that are padding in every remaining row hold nothing: cut them so the cache tracks the live rows.
        first = int(self.mask.any(0).nonzero()[0])
        if first > 0 and self.can_join:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
            self.mask = self.mask[:, first:]
