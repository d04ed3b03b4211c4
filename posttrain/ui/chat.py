"""The chat playground: the base model, or the base with any run's LoRA adapter, through posttrain's serving engine.

The base is loaded once, on the first message (so the UI starts without loading a model); each run's adapter is
loaded beside it on its first use, under the run's name, and answers come from the same Engine and Scheduler as
``posttrain serve``: every adapter shares one copy of the base, and concurrent chats are batched together. The
adapters a client may pick are the run folders under the runs directory, found and checked by serve/adapters.py.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any

from posttrain.serve import api
from posttrain.serve.adapters import check_servable, discover, resolve_in_dir
from posttrain.serve.api import ServeError

log = logging.getLogger("posttrain.ui")

BASE_NAME = "base"  # the base model's name in the model menu and in requests
_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def _weights_mtime(folder: Path) -> float:
    return max((f.stat().st_mtime for f in map(folder.joinpath, _WEIGHTS) if f.is_file()), default=0.0)


class Playground:
    """Chats with ``model`` (None: the embedded model) and the adapters of the runs under ``runs_dir``."""

    def __init__(self, runs_dir: Path, model: str | None = None, *, dtype: str = "auto", timeout_s: float = 600.0):
        self.runs_dir, self.model, self.dtype, self.timeout_s = Path(runs_dir).resolve(), model, dtype, timeout_s
        self._lock = threading.Lock()  # one loader of the base
        self._adapter_lock = threading.Lock()  # one loader of adapters: two would unload each other's fresh load
        self.engine = self.scheduler = None
        self._loaded: dict[str, float] = {}  # adapter name -> its weights' mtime when loaded

    def models(self) -> list[str]:
        """The base and every run with an adapter (directly under the runs directory, as ``posttrain serve
        --adapter-dir`` finds them)."""
        return [BASE_NAME] + [n for n in discover(self.runs_dir) if n != BASE_NAME]

    def _start(self) -> None:
        with self._lock:
            if self.scheduler is not None:
                return
            from posttrain.models import load_model
            from posttrain.serve.engine import Engine
            from posttrain.serve.scheduler import Scheduler

            t0 = time.perf_counter()
            loaded = load_model(self.model, dtype=self.dtype)
            self.engine = Engine(loaded.model, loaded.tokenizer, base_path=loaded.path)
            self.scheduler = Scheduler(self.engine, served_name=BASE_NAME)
            self.scheduler.start()
            log.info("chat: base %s loaded in %.1f s", loaded.path, time.perf_counter() - t0)

    def _adapter(self, name: str) -> None:
        """Load run ``name``'s adapter, or reload it when its weights changed (the run was trained again)."""
        folder = resolve_in_dir(self.runs_dir, name)
        check_servable(folder, name, None)
        engine = self.engine

        def swap():
            if name in engine.adapters:
                engine.unload_adapter(name)
            engine.load_adapter(name, folder)

        with self._adapter_lock:
            mtime = _weights_mtime(folder)
            if self._loaded.get(name) != mtime:
                self.scheduler.call(swap, self.timeout_s)
                self._loaded[name] = mtime

    def chat(self, body: Any) -> dict[str, Any]:
        """One answer to an OpenAI-style chat body (model, messages, temperature, max_tokens; validated by the
        server's own parser): {text, finish_reason, prompt_tokens, completion_tokens, seconds}."""
        gen = api.parse_generation(body, "chat")
        if gen.n != 1 or gen.stream:
            raise ServeError(400, "the playground answers one choice at a time, not streamed", param="n")
        if gen.model != BASE_NAME and gen.model not in discover(self.runs_dir):
            raise ServeError(404, f"model {gen.model!r} is neither {BASE_NAME!r} nor a run with an adapter under "
                                  f"{self.runs_dir}", param="model")
        t0 = time.perf_counter()
        self._start()
        if gen.model != BASE_NAME:
            self._adapter(gen.model)
        tok = self.engine.tokenizer
        if not getattr(tok, "chat_template", None):
            raise ServeError(400, "this model's tokenizer has no chat template", param="messages")
        try:
            text = tok.apply_chat_template(gen.prompts[0], tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # the template's own checks (role order, ...) raise here
            raise ServeError(400, f"the chat template refused these messages: {exc}", param="messages") from exc
        ids = tok(text, add_special_tokens=False)["input_ids"]
        from posttrain.serve.scheduler import Request

        events: queue.Queue = queue.Queue()
        request = Request(prompt_ids=ids, model=gen.model, events=events,
                          sampling=api.sampling_for(gen, len(ids), self.engine.max_len))
        self.scheduler.submit(request)
        pieces, deadline = [], time.monotonic() + self.timeout_s
        try:
            while True:
                try:
                    _, kind, data = events.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    raise ServeError(504, f"no answer within {self.timeout_s:.0f} s") from None
                if kind == "text":
                    pieces.append(data["text"])
                elif kind == "error":
                    raise ServeError(data["status"], data["message"])
                else:
                    return {"model": gen.model, "text": "".join(pieces), "finish_reason": data["finish_reason"],
                            "prompt_tokens": data["prompt_tokens"], "completion_tokens": data["completion_tokens"],
                            "seconds": round(time.perf_counter() - t0, 2)}
        finally:
            request.cancelled = True  # a timed-out answer stops decoding at the next step

    def stop(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()
