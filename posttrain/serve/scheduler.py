"""The one thread that touches the model.

HTTP handler threads queue requests; this thread admits what is waiting (after a few ms, so a burst lands in
one batch), runs one decode step for every running row, and between steps runs adapter loads and unloads, so
no forward ever sees a half-changed model. Each request gets its text through its own queue; handlers wait on
it with a timeout.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from posttrain.serve.api import Sampling, ServeError
from posttrain.serve.engine import Engine

log = logging.getLogger("posttrain.serve")


@dataclass
class Request:
    """One prompt to complete. Events go to ``events`` as (index, kind, data): kind "text" (data["text"]),
    then exactly one of "done" (finish_reason, token counts, the sampled token_ids, and logprobs: a list of
    logprobs.Step when the sampling asked for them, else None) or "error" (status, message)."""
    prompt_ids: list[int]
    model: str
    sampling: Sampling
    events: queue.Queue
    index: int = 0
    cancelled: bool = False  # set by the handler (client gone, timeout); the row is dropped at the next step
    finished: bool = field(default=False, repr=False)

    def emit(self, kind: str, **data: Any) -> None:
        if self.finished:
            return
        self.finished = kind in ("done", "error")
        self.events.put((self.index, kind, data))


class Scheduler:
    def __init__(self, engine: Engine, *, served_name: str, max_batch: int = 16, batch_wait_s: float = 0.005):
        self.engine, self.served_name = engine, served_name
        self.max_batch, self.batch_wait_s = max_batch, batch_wait_s
        self.inbox: queue.Queue = queue.Queue()  # Request, or None to wake the loop for a control call
        self.control: queue.Queue = queue.Queue()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="posttrain-serve-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stopping.set()
        self.inbox.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def submit(self, request: Request) -> None:
        if self._stopping.is_set():
            raise ServeError(503, "the server is shutting down")
        self.inbox.put(request)

    def call(self, fn: Callable[[], Any], timeout_s: float) -> Any:
        """Run ``fn`` on the scheduler thread between two steps; its exception is re-raised here."""
        if not self._thread.is_alive():
            return fn()  # not started (set-up before serving): nothing else touches the model
        reply: queue.Queue = queue.Queue(1)
        self.control.put((fn, reply))
        self.inbox.put(None)
        try:
            ok, value = reply.get(timeout=timeout_s)
        except queue.Empty:
            raise ServeError(504, f"the model was busy for {timeout_s:.0f} s; the operation may still complete")
        if not ok:
            raise value
        return value

    def _loop(self) -> None:
        while not self._stopping.is_set():
            new: list[Request] = []
            try:
                self._run_control()
                new = self._collect()
                with torch.inference_mode():
                    if new:
                        self.engine.add(new, self.served_name)
                    self.engine.step()
            except Exception as exc:  # a failed forward fails its batch, not the server
                log.exception("generation failed")
                self.engine.fail_all(500, f"generation failed: {type(exc).__name__}: {exc}")
                for r in new:
                    r.emit("error", status=500, message=f"generation failed: {type(exc).__name__}: {exc}")
        self.engine.fail_all(503, "the server is shutting down")
        self._run_control()
        while True:
            try:
                r = self.inbox.get_nowait()
            except queue.Empty:
                break
            if r is not None:
                r.emit("error", status=503, message="the server is shutting down")

    def _run_control(self) -> None:
        while True:
            try:
                fn, reply = self.control.get_nowait()
            except queue.Empty:
                return
            try:
                reply.put((True, fn()))
            except Exception as exc:
                reply.put((False, exc))

    def _collect(self) -> list[Request]:
        """Requests to admit now: when idle, wait for one, then up to batch_wait_s for more; when running, only
        what is already waiting (joining costs the running rows one prefill's time)."""
        running = len(self.engine.rows)
        free = self.max_batch - running
        if free <= 0 or (running and not self.engine.can_join):
            return []
        try:
            first = self.inbox.get(timeout=0.05) if not running else self.inbox.get_nowait()
        except queue.Empty:
            return []
        if first is None:
            return []
        batch = [first]
        deadline = time.monotonic() + (0.0 if running else self.batch_wait_s)
        while len(batch) < free:
            left = deadline - time.monotonic()
            try:
                r = self.inbox.get(timeout=left) if left > 0 else self.inbox.get_nowait()
            except queue.Empty:
                break
            if r is not None:
                batch.append(r)
        return [r for r in batch if not r.cancelled]
