"""An OpenAI-compatible HTTP server (stdlib ``http.server``) in front of the scheduler.

Routes: GET /v1/models[/ID], POST /v1/chat/completions, POST /v1/completions (both with SSE streaming),
POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's names), and GET /health (no key needed).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

from posttrain.models.quant import is_quantized
from posttrain.serve import api
from posttrain.serve.adapters import check_servable, discover, resolve_in_dir
from posttrain.serve.api import ServeError
from posttrain.serve.engine import Engine
from posttrain.serve.http import ClientGone, JSONHandler, LimitedHTTPServer, Limits, bearer_ok, parse_json, peer_closed
from posttrain.serve.scheduler import Request, Scheduler

log = logging.getLogger("posttrain.serve")


class Server:
    """Owns the HTTP listener, the scheduler thread and the engine. ``port=0`` picks a free port (tests)."""

    def __init__(self, engine: Engine, adapter_dir: str | Path, *, served_name: str = "base",
                 host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, max_batch: int = 16,
                 batch_wait_s: float = 0.005, timeout_s: float = 600.0, max_body_bytes: int = 8 << 20,
                 header_timeout_s: float = 10.0, body_timeout_s: float = 10.0, max_connections: int = 128):
        self.engine, self.served_name = engine, served_name
        self.quantization = "nf4" if is_quantized(engine.base) else None
        self.adapter_dir = Path(adapter_dir).resolve()
        if not self.adapter_dir.is_dir():
            raise FileNotFoundError(f"adapter directory {adapter_dir} does not exist")
        self.api_key = api_key or None
        self.timeout_s, self.max_body_bytes = timeout_s, max_body_bytes
        self.created = int(time.time())
        self.scheduler = Scheduler(engine, served_name=served_name, max_batch=max_batch, batch_wait_s=batch_wait_s)
        # Handlers tokenize concurrently, with no lock: a fast tokenizer's backend is only changed (and then refuses
        # concurrent use) when a call asks for other truncation or padding settings than it holds. Every call here
        # asks for the same, so after this first call all of them only read it.
        engine.tokenizer("warm-up", add_special_tokens=True)
        self.chars_per_token = api.chars_per_token_bound(engine.tokenizer)
        limits = Limits(header_timeout_s=header_timeout_s, body_timeout_s=body_timeout_s, write_timeout_s=timeout_s,
                        max_connections=max_connections, max_body_bytes=max_body_bytes)
        self.httpd = LimitedHTTPServer((host, port), Handler, limits)
        self.httpd.app = self
        self._http_thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self.httpd.server_address[0]}:{self.port}/v1"

    def load_adapter_dir(self) -> tuple[list[str], dict[str, str]]:
        """Load every adapter folder in the adapter directory under its folder name: (loaded, {skipped: why})."""
        loaded, skipped = [], {}
        for name in discover(self.adapter_dir):
            try:
                self.load_adapter(name, name)
                loaded.append(name)
            except ServeError as exc:
                skipped[name] = exc.message
                log.warning("adapter %s not loaded: %s", name, exc.message)
        return loaded, skipped

    def load_adapter(self, name: str, lora_path: str):
        if name == self.served_name:
            raise ServeError(409, f"{name!r} is the base model's served name", param="lora_name")
        folder = resolve_in_dir(self.adapter_dir, lora_path)
        check_servable(folder, lora_path, self.quantization)
        return self.scheduler.call(lambda: self.engine.load_adapter(name, folder), self.timeout_s)

    def unload_adapter(self, name: str) -> None:
        self.scheduler.call(lambda: self.engine.unload_adapter(name), self.timeout_s)

    def start(self) -> "Server":
        """Serve from background threads (tests, notebooks); ``stop()`` ends them."""
        self.scheduler.start()
        self._http_thread = threading.Thread(target=self.httpd.serve_forever, name="posttrain-serve-http",
                                             daemon=True)
        self._http_thread.start()
        return self

    def serve_forever(self) -> None:
        self.scheduler.start()
        self.httpd.serve_forever()

    def stop(self) -> None:
        if self._http_thread is not None:
            self.httpd.shutdown()
            self._http_thread.join(10)
        self.httpd.server_close()
        self.scheduler.stop()

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def authorised(self, header: str | None) -> bool:
        """Whether the Authorization header is exactly ``Bearer KEY`` (the scheme's case aside, RFC 7235)."""
        return bearer_ok(header, self.api_key)

    def model_cards(self) -> list[dict]:
        base = {"id": self.served_name, "object": "model", "created": self.created, "owned_by": "posttrain",
                "root": self.engine.base_path or self.served_name, "parent": None}
        return [base] + [{"id": a.name, "object": "model", "created": self.created, "owned_by": "posttrain",
                          "root": a.path, "parent": self.served_name} for a in self.engine.adapters.values()]

    def encode(self, gen: api.GenerationRequest) -> list[list[int]]:
        """Each prompt's token ids. A prompt too long for the context by its length in characters alone is refused
        before it is tokenized (which takes seconds for megabytes)."""
        tok = self.engine.tokenizer
        if gen.kind == "completion" and isinstance(gen.prompts[0], list):
            return gen.prompts  # token ids, used as they are: no BOS added, no re-tokenizing
        if gen.kind == "completion":
            texts, special = gen.prompts, True
        else:
            if not getattr(tok, "chat_template", None):
                raise ServeError(400, "this model's tokenizer has no chat template; use /v1/completions",
                                 param="messages")
            try:
                texts = [tok.apply_chat_template(gen.prompts[0], tokenize=False, add_generation_prompt=True)]
            except Exception as exc:  # the template's own checks (role order, ...) raise here
                raise ServeError(400, f"the chat template refused these messages: {exc}", param="messages") from exc
            special = False  # the rendered template carries its own special tokens
        for text in texts:
            api.check_prompt_chars(gen, len(text), self.chars_per_token, self.engine.max_len)
        return [tok(text, add_special_tokens=special)["input_ids"] for text in texts]


_ROUTES = {  # path -> {method: Handler method name}
    "/v1/models": {"GET": "models"},
    "/v1/chat/completions": {"POST": "chat"},
    "/v1/completions": {"POST": "completions"},
    "/v1/load_lora_adapter": {"POST": "load_lora"},
    "/v1/unload_lora_adapter": {"POST": "unload_lora"},
    "/health": {"GET": "health"},
}
_METHODS = ("GET", "POST")  # every route's methods
# A waiting handler checks that its client is still there at most every _CHECK_S, when woken by a token, and wakes
# by itself every _IDLE_S when none comes (queued, or a long prefill): decoding threads are not woken any more often
# than tokens already wake them.
_CHECK_S, _IDLE_S = 0.05, 0.25


class Handler(JSONHandler):
    server_version = "posttrain-serve"

    @property
    def app(self) -> Server:
        return self.server.app

    def dispatch(self, method: str) -> None:
        route = None
        try:
            # The body is read (or refused) first, so the connection stays in step whatever is answered.
            raw = self.read_body()
            path = unquote(urlsplit(self.path).path).rstrip("/") or "/"
            route = _ROUTES.get("/v1/models" if path.startswith("/v1/models/") else path)
            if method not in _METHODS:  # no route has it: said before the key is asked for, as for a CORS preflight
                raise ServeError(405, f"method {method} is not supported; {path} accepts "
                                      f"{', '.join(route or _METHODS)}")
            if path != "/health" and not self.app.authorised(self.headers.get("Authorization")):
                raise ServeError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                 code="invalid_api_key")
            if route is None:
                raise ServeError(404, f"no route {path}", code="unknown_route")
            if method not in route:
                raise ServeError(405, f"{path} accepts {', '.join(route)}, not {method}")
            body = parse_json(raw, self.limits.max_json_depth) if method == "POST" else None
            getattr(self, route[method])(path, body)
        except ServeError as exc:
            self.send_json(exc.status, exc.body(), allow=(route or _METHODS) if exc.status == 405 else None)
        except ClientGone:
            self.close_connection = True
        except Exception as exc:
            log.exception("request failed")
            self.send_json(500, ServeError(500, f"internal error: {type(exc).__name__}: {exc}").body())

    def _events(self, requests: list[Request], events: queue.Queue):
        """(index, kind, data) until every request is done; raises ServeError on an error or a stall, ClientGone
        when the client hangs up."""
        pending = {r.index for r in requests}
        stall = self.app.timeout_s
        try:
            last_token = checked = time.monotonic()
            while pending:
                try:
                    item = events.get(timeout=_IDLE_S)
                except queue.Empty:
                    item = None
                now = time.monotonic()
                if item is not None:
                    last_token = now
                elif now - last_token > stall:
                    raise ServeError(504, f"no token for {stall:.0f} s; request abandoned")
                if now - checked >= _CHECK_S:  # also while tokens flow: a plain answer writes nothing until the end
                    checked = now
                    if peer_closed(self.connection):
                        raise ClientGone()
                if item is None:
                    continue
                index, kind, data = item
                if kind == "error":
                    raise ServeError(data["status"], data["message"])
                if kind == "done":
                    pending.discard(index)
                yield index, kind, data
        finally:  # normal end, error, timeout, or client gone: the scheduler drops the rows still decoding
            for r in requests:
                r.cancelled = True

    # ---- routes ----

    def health(self, path, body):
        self.send_json(200, {"status": "ok", "adapters": sorted(self.app.engine.adapters),
                             "stats": dict(self.app.engine.stats)})

    def models(self, path, body):
        cards = self.app.model_cards()
        if path == "/v1/models":
            return self.send_json(200, {"object": "list", "data": cards})
        wanted = path.removeprefix("/v1/models/")
        card = next((c for c in cards if c["id"] == wanted), None)
        if card is None:
            raise ServeError(404, f"model {wanted!r} is not served here", param="model", code="model_not_found")
        self.send_json(200, card)

    def load_lora(self, path, body):
        name, lora_path = self._field(body, "lora_name"), self._field(body, "lora_path")
        adapter = self.app.load_adapter(name, lora_path)
        self.send_json(200, {"object": "lora_adapter", "id": name, "path": adapter.path,
                             "message": f"Success: LoRA adapter '{name}' added successfully."})

    def unload_lora(self, path, body):
        name = self._field(body, "lora_name")
        self.app.unload_adapter(name)
        self.send_json(200, {"object": "lora_adapter", "id": name, "deleted": True,
                             "message": f"Success: LoRA adapter '{name}' removed successfully."})

    @staticmethod
    def _field(body, name: str) -> str:
        value = body.get(name) if isinstance(body, dict) else None
        if not isinstance(value, str) or not value:
            raise ServeError(400, f"'{name}' is required: a non-empty string", param=name)
        return value

    def chat(self, path, body):
        self._generate(api.parse_generation(body, "chat"))

    def completions(self, path, body):
        self._generate(api.parse_generation(body, "completion", self.app.engine.vocab_size))

    def _generate(self, gen: api.GenerationRequest) -> None:
        app = self.app
        if app.engine.key_of(gen.model, app.served_name) is None:
            raise ServeError(404, f"model {gen.model!r} is not served here; GET /v1/models lists the base "
                                  f"({app.served_name!r}) and the loaded adapters", param="model",
                             code="model_not_found")
        prompt_ids = app.encode(gen)
        events: queue.Queue = queue.Queue()
        samplings = [api.sampling_for(gen, len(ids), app.engine.max_len) for ids in prompt_ids]
        # OpenAI's order: choice p * n + j is prompt p's j-th.
        requests = [Request(prompt_ids=ids, model=gen.model, events=events, index=p * gen.n + j,
                            sampling=api.choice_sampling(s, j))
                    for p, (ids, s) in enumerate(zip(prompt_ids, samplings)) for j in range(gen.n)]
        for r in requests:
            app.scheduler.submit(r)
        rid = api.new_id(gen.kind)
        prompt_tokens = sum(map(len, prompt_ids))  # once per prompt, however many choices it has (as OpenAI)
        (self._stream if gen.stream else self._complete)(gen, rid, requests, events, prompt_tokens)

    def _complete(self, gen, rid, requests, events, prompt_tokens: int) -> None:
        choices = [api.Choice(prompt_ids=r.prompt_ids) for r in requests]
        for index, kind, data in self._events(requests, events):
            c = choices[index]
            if kind == "text":
                c.text += data["text"]
            else:
                c.finish_reason, c.token_ids, c.steps = data["finish_reason"], data["token_ids"], data["logprobs"]
        use = api.usage(prompt_tokens, sum(len(c.token_ids) for c in choices))
        self.send_json(200, api.response(gen, rid, choices, use, self.app.engine.tokenizer))

    def _stream(self, gen, rid, requests, events, prompt_tokens: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        kind, model = gen.kind, gen.model
        completion_tokens = 0
        try:
            if kind == "chat":
                for r in requests:
                    self.send_event(api.chunk(kind, rid, model, r.index, first=True))
            for index, event, data in self._events(requests, events):
                if event == "text":
                    self.send_event(api.chunk(kind, rid, model, index, text=data["text"]))
                else:
                    completion_tokens += data["completion_tokens"]
                    self.send_event(api.chunk(kind, rid, model, index, finish_reason=data["finish_reason"]))
            if gen.include_usage:
                use = api.usage(prompt_tokens, completion_tokens)
                self.send_event(api.chunk(kind, rid, model, None, use=use))
        except ServeError as exc:  # the status line is gone: report in-band, as OpenAI-compatible servers do
            self.send_event(exc.body())
        except ClientGone:
            raise
        except Exception as exc:
            log.exception("stream failed")
            self.send_event(ServeError(500, f"internal error: {type(exc).__name__}: {exc}").body())
        self.send_event("[DONE]")
        self.write_chunk(b"")


def serve(*, model: str | None, adapter_dir: str, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, served_name: str = "base", max_batch: int = 16, dtype: str = "auto",
          timeout_s: float = 600.0, quantization: str = "none", header_timeout_s: float = 10.0,
          body_timeout_s: float = 10.0, max_connections: int = 128, logprobs_mode: str = "raw_logprobs") -> int:
    """Load the base, the adapters in ``adapter_dir``, and serve until interrupted. ``logprobs_mode`` is vLLM's
    --logprobs-mode: which distribution reported logprobs come from (serve/logprobs.py)."""
    from posttrain.models import Quantization, load_model

    adapter_root = Path(adapter_dir)
    if not adapter_root.is_dir():
        raise FileNotFoundError(f"adapter directory {adapter_dir} does not exist (create it, even empty)")
    loaded = load_model(model, dtype=dtype, quantization=None if quantization == "none" else Quantization(quantization))
    engine = Engine(loaded.model, loaded.tokenizer, base_path=loaded.path, logprobs_mode=logprobs_mode)
    try:
        server = Server(engine, adapter_root, served_name=served_name, host=host, port=port, api_key=api_key,
                        max_batch=max_batch, timeout_s=timeout_s, header_timeout_s=header_timeout_s,
                        body_timeout_s=body_timeout_s, max_connections=max_connections)
    except OSError as exc:  # port taken, address not available
        log.error("error: cannot listen on %s:%s: %s", host, port, exc)
        return 2
    names, skipped = server.load_adapter_dir()
    log.info("base %s served as %r on %s (%s, %s)", loaded.path, served_name, loaded.device, loaded.dtype,
             "API key required" if server.api_key else "no API key")
    log.info("adapters from %s: %s%s", server.adapter_dir, ", ".join(names) or "none",
             f"; {len(skipped)} skipped: {', '.join(skipped)}" if skipped else "")
    log.info("listening on %s (OpenAI base_url)", server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        server.stop()
    return 0
