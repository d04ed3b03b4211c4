"""posttrain serve under hostile or careless clients: request validation as in training, strict API keys, deep
JSON, odd methods, clients that hang up, dribble or stall, too many connections, huge prompts, broken adapters.

Driven over raw sockets and http.client: the point is what arrives on the wire, and when.
"""

import http.client
import json
import shutil
import socket
import threading
import time

import pytest

from posttrain.serve import Server
from tests.helpers import make_adapter, new_engine

KEY = "limits-key"
HEADER_S, BODY_S = 0.5, 1.0  # unequal, so each test shows its own deadline at work


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("serve-limits")
    make_adapter(tiny_dir, root / "src", seed=1, targets=["q_proj", "v_proj"])
    (root / "adapters").mkdir()
    return root


def start(tiny_dir, adapter_dir, **kw) -> Server:
    kw = {"header_timeout_s": HEADER_S, "body_timeout_s": BODY_S, **kw}
    return Server(new_engine(tiny_dir), adapter_dir / "adapters", port=0, api_key=KEY, timeout_s=60, **kw).start()


@pytest.fixture(scope="module")
def server(tiny_dir, adapter_dir):
    srv = start(tiny_dir, adapter_dir)
    yield srv
    srv.stop()


def request(server, method: str, path: str, body=None, headers=None, auth: str | None = f"Bearer {KEY}"):
    """(status, headers, parsed JSON body or None) over a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json", **({"Authorization": auth} if auth else {}), **(headers or {})}
    try:
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, resp.headers, json.loads(raw) if raw else None
    finally:
        conn.close()


def assert_openai_error(body, status_type: str | None = None):
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    if status_type:
        assert body["error"]["type"] == status_type


def http_bytes(method: str, path: str, body: bytes = b"", extra: str = "") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json"
            f"\r\nContent-Length: {len(body)}\r\n{extra}\r\n").encode() + body


def read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and when it closed (seconds from the call)."""
    t, out = time.monotonic(), b""
    sock.settimeout(limit_s)
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out, time.monotonic() - t


# ---- 1. messages validated as in training ----

def test_chat_roles_and_order_are_refused_as_training_refuses_them(server):
    path = "/v1/chat/completions"
    for messages, param in [([{"role": "wizard", "content": "hi"}], "messages[0].role"),
                            ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "messages[1].role"),
                            ([{"role": "assistant", "content": "a"}], "messages[0].role"),
                            ([{"role": "user"}], "messages[0].content"),
                            ([{"role": "system", "content": "be brief"}], "messages")]:
        status, _, body = request(server, "POST", path, {"model": "base", "messages": messages, "max_tokens": 2})
        assert status == 400, (messages, body)
        assert_openai_error(body, "invalid_request_error")
        assert body["error"]["param"] == param, (messages, body)
    status, _, body = request(server, "POST", path, {"model": "base", "max_tokens": 2,
                                                     "messages": [{"role": "wizard", "content": "hi"}]})
    assert "wizard" in body["error"]["message"]
    ok = [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
          {"role": "user", "content": "c"}]
    status, _, body = request(server, "POST", path, {"model": "base", "messages": ok, "max_tokens": 2})
    assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"


def test_text_content_parts_are_joined_as_training_joins_them(server):
    from posttrain.data.formats import validate_messages
    from posttrain.errors import DataError

    parts = [{"type": "text", "text": "Name three colours."}, {"type": "text", "text": "Be brief."}]
    try:
        text = validate_messages([{"role": "user", "content": parts}, {"role": "assistant", "content": "x"}],
                                 "t", 1)[0]["content"]
    except DataError:
        pytest.skip("posttrain.data.formats.validate_messages does not take content parts yet")
    assert "Name three colours." in text and "Be brief." in text
    path = "/v1/chat/completions"
    joined = {"model": "base", "max_tokens": 6, "temperature": 0, "messages": [{"role": "user", "content": text}]}
    status, _, plain = request(server, "POST", path, joined)
    status2, _, split = request(server, "POST", path, {**joined, "messages": [{"role": "user", "content": parts}]})
    assert status == status2 == 200
    assert split["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    image = [{"type": "image_url", "image_url": {"url": "data:,"}}]
    status, _, body = request(server, "POST", path, {**joined, "messages": [{"role": "user", "content": image}]})
    assert status == 400 and "image_url" in body["error"]["message"]


# ---- 2. API key: exactly "Bearer KEY" ----

def test_api_key_without_the_bearer_scheme_is_refused(server):
    for auth in (KEY, f"Basic {KEY}", f"Bearer{KEY}", f"Bearer  {KEY}", f"Bearer {KEY}x", "Bearer", None):
        status, _, body = request(server, "GET", "/v1/models", auth=auth)
        assert status == 401, auth
        assert body["error"]["code"] == "invalid_api_key"
    for auth in (f"Bearer {KEY}", f"bearer {KEY}"):  # the scheme is case-insensitive (RFC 7235)
        assert request(server, "GET", "/v1/models", auth=auth)[0] == 200


# ---- 3. deep JSON ----

def test_deeply_nested_json_is_a_400_not_a_500(server):
    nested: list = []
    for _ in range(40):
        nested = [nested]
    for body in (b"[" * 100_000, json.dumps({"model": "base", "prompt": "x", "user": nested}).encode()):
        status, _, err = request(server, "POST", "/v1/completions", body)
        assert status == 400, err
        assert_openai_error(err)
        assert "nests deeper than 32" in err["error"]["message"]
    assert request(server, "POST", "/v1/completions", {"model": "base", "prompt": "x", "max_tokens": 1})[0] == 200


# ---- 4. methods ----

def test_unsupported_methods_get_a_json_405_with_allow(server):
    for method, path, allow in [("HEAD", "/v1/models", "GET"), ("OPTIONS", "/v1/chat/completions", "POST"),
                                ("PUT", "/v1/completions", "POST"), ("BREW", "/health", "GET"),
                                ("OPTIONS", "/nowhere", "GET, POST"), ("GET", "/v1/completions", "POST")]:
        status, headers, body = request(server, method, path, auth=None if method == "OPTIONS" else f"Bearer {KEY}")
        assert status == 405, (method, path, body)
        assert headers["Allow"] == allow and headers["Content-Type"] == "application/json"
        if method == "HEAD":
            assert body is None  # headers only
        else:
            assert_openai_error(body, "invalid_request_error")
            assert method in body["error"]["message"]
    # A HEAD answer has no body, so the keep-alive connection stays in step for the next request.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("HEAD", "/health")
    assert conn.getresponse().read() == b""
    conn.request("GET", "/health")
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["status"] == "ok"
    conn.close()


def test_requests_the_stdlib_refuses_get_json_errors_too(server):
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"GET /health HTTP/1.1\r\n" + b"X-Many: 1\r\n" * 101 + b"\r\n")
        out, _ = read_until_closed(s, 5)
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431") and b"application/json" in head and b"Connection: close" in head
    assert_openai_error(json.loads(body))


# ---- 5. a client that goes away cancels its generation ----

def _tokens_after_hanging_up(server, body: dict, read_first: bool) -> tuple[int, int]:
    """Send a long greedy generation, hang up once it is decoding: (tokens decoded while connected, after)."""
    engine = server.engine
    start_tokens = engine.stats["tokens"]
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(http_bytes("POST", "/v1/completions", json.dumps(body).encode()))
    if read_first:
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
    deadline = time.monotonic() + 30
    while engine.stats["tokens"] - start_tokens < 20 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert engine.rows, "the generation ended before the client hung up: the test shows nothing"
    s.close()
    at_close = engine.stats["tokens"]
    deadline = time.monotonic() + 20
    while engine.rows and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine.rows
    return at_close - start_tokens, engine.stats["tokens"] - at_close


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_client_hanging_up_mid_generation_stops_its_decoding(server, stream):
    body = {"model": "base", "prompt": "The sky is", "max_tokens": 1500, "temperature": 0, "stream": stream}
    before, after = _tokens_after_hanging_up(server, body, read_first=stream)
    print(f"tokens decoded before hanging up {before}, after {after}")
    # Unchecked, it decodes on to 1500. The server looks for a closed socket every 50 ms, so what it decodes after
    # the hang-up depends on the machine's speed (70 tokens on a loaded 2-core run); a quarter of the rest is a
    # bound that holds on any CPU and still fails a server that never notices.
    assert before < 1000 and after < 0.25 * (1500 - before), (before, after)
    # and the server still answers
    assert request(server, "POST", "/v1/completions", {"model": "base", "prompt": "x", "max_tokens": 2})[0] == 200


# ---- 6. slow clients and too many of them ----

def test_headers_sent_a_byte_at_a_time_are_cut_off_at_the_header_timeout(server):
    s = socket.create_connection(("127.0.0.1", server.port))
    t = time.monotonic()
    s.sendall(b"GET /health HTTP/1.1\r\n")
    s.settimeout(0.05)
    closed = None
    try:
        while time.monotonic() - t < 5:
            s.sendall(b"X")  # every 50 ms: each read is quick, the whole never ends
            try:
                if s.recv(1) == b"":
                    closed = time.monotonic() - t
                    break
            except TimeoutError:
                pass
    except (BrokenPipeError, ConnectionResetError):
        closed = time.monotonic() - t
    s.close()
    assert closed is not None and HEADER_S * 0.9 < closed < HEADER_S + 1.5, closed


def test_idle_keep_alive_connection_is_closed_after_the_header_timeout(server):
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        out, took = read_until_closed(s, 5)
    assert out == b"" and took < HEADER_S + 1.5


def test_a_stalled_body_gets_408_at_the_body_timeout(server):
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        head = http_bytes("POST", "/v1/completions", b"x" * 200)
        s.sendall(head[:-180])  # the headers and 20 of the 200 bytes
        out, took = read_until_closed(s, 5)
    status_line, _, rest = out.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 408 Request Timeout" and b"Connection: close" in rest
    assert_openai_error(json.loads(rest.partition(b"\r\n\r\n")[2]), "timeout_error")
    assert BODY_S * 0.9 < took < BODY_S + 1.5, took


def test_connections_past_the_cap_get_a_json_503(tiny_dir, adapter_dir):
    srv = start(tiny_dir, adapter_dir, max_connections=3, header_timeout_s=5.0)
    held = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(3)]
    try:
        time.sleep(0.2)  # the server has taken all three
        status, headers, body = request(srv, "GET", "/health")
        assert status == 503 and headers["Connection"] == "close"
        assert_openai_error(body, "server_error")
        assert body["error"]["code"] == "too_many_connections"
        held.pop().close()
        deadline = time.monotonic() + 5
        while (status := request(srv, "GET", "/health")[0]) == 503 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status == 200  # a slot freed by a closed connection is given out again
    finally:
        for s in held:
            s.close()
        srv.stop()


def test_a_taken_port_is_an_os_error(server, tiny_dir, adapter_dir):
    with pytest.raises(OSError):  # what `posttrain serve` reports as "cannot listen"
        Server(new_engine(tiny_dir), adapter_dir / "adapters", port=server.port)


# ---- 7. huge prompts: refused before tokenizing, without holding anyone up ----

def test_char_bound_never_exceeds_the_real_token_count(server):
    from posttrain.serve.api import chars_per_token_bound

    tok = server.engine.tokenizer
    n = chars_per_token_bound(tok)
    vocab = tok.get_vocab()
    longest = max(vocab, key=len)
    text_of_longest = tok.convert_tokens_to_string([longest])
    texts = [text_of_longest * 50, " " * 5000, "\n" * 3000, "=" * 4000, "#" * 4000, "hello world " * 500,
             "héllo 世界 🎉" * 300, "<|im_start|>" * 200, "a" * 10_000, "ᄀ\u1161\u11a8" * 1000]
    for text in texts:
        tokens = len(tok(text, add_special_tokens=False)["input_ids"])
        assert tokens >= -(-len(text) // n), (text[:20], tokens, len(text), n)
    # and the bound is close to tight on the longest entry's own text: the check refuses early, not never
    assert len(tok(text_of_longest * 50, add_special_tokens=False)["input_ids"]) <= 100


def test_huge_prompt_is_refused_fast_and_does_not_hold_up_other_requests(server):
    huge = {"model": "base", "prompt": "hello world " * 660_000, "max_tokens": 4}  # ~7.9 MB, under the 8 MiB limit
    small = {"model": "base", "prompt": "The sky is", "max_tokens": 4, "temperature": 0}
    results = {}

    def go(name, body):
        t = time.monotonic()
        results[name] = request(server, "POST", "/v1/completions", body), time.monotonic() - t

    threads = [threading.Thread(target=go, args=("huge", huge))]
    threads[0].start()
    time.sleep(0.05)
    threads.append(threading.Thread(target=go, args=("small", small)))
    threads[1].start()
    for t in threads:
        t.join(60)
    (status, _, body), huge_s = results["huge"]
    assert status == 400 and body["error"]["param"] == "prompt" and "context" in body["error"]["message"]
    (small_status, _, _), small_s = results["small"]
    assert small_status == 200
    # Tokenizing it in full takes ~4 s here (under a server-wide lock, before this change).
    assert huge_s < 2.0 and small_s < 2.0, (huge_s, small_s)
    chat = {"model": "base", "messages": [{"role": "user", "content": "x" * 7_000_000}]}
    t = time.monotonic()
    status, _, body = request(server, "POST", "/v1/chat/completions", chat)
    assert status == 400 and body["error"]["param"] == "messages" and time.monotonic() - t < 2.0


def test_prompts_near_the_limit_are_still_measured_exactly(server):
    ctx = server.engine.max_len
    fits = {"model": "base", "prompt": "hello " * (ctx - 10), "max_tokens": 2}  # ~a token a word: just fits
    status, _, body = request(server, "POST", "/v1/completions", fits)
    assert status == 200, body
    over = {**fits, "max_tokens": 20}
    status, _, body = request(server, "POST", "/v1/completions", over)
    assert status == 400 and body["error"]["param"] == "max_tokens"
    exact = len(server.engine.tokenizer(fits["prompt"])["input_ids"])
    assert f"prompt ({exact} tokens)" in body["error"]["message"]  # the real count, not the character bound


def test_concurrent_tokenizing_without_a_lock_gives_the_same_ids(server):
    from posttrain.serve import api

    texts = [f"prompt number {i} " * (i % 7 + 1) for i in range(40)]
    gens = [api.parse_generation({"model": "base", "prompt": t}, "completion") for t in texts]
    alone = [server.encode(g) for g in gens]
    got, errors = [None] * len(gens), []

    def work(k):
        try:
            for i in range(k, len(gens), 8):
                got[i] = server.encode(gens[i])
        except Exception as exc:  # noqa: BLE001 - any failure is the finding
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and got == alone


# ---- 8. an adapter folder without weights ----

def test_adapter_folder_without_weights_names_the_missing_file(server, adapter_dir):
    folder = adapter_dir / "adapters" / "no-weights"
    shutil.copytree(adapter_dir / "src", folder, ignore=shutil.ignore_patterns("adapter_model.*"))
    try:
        status, _, body = request(server, "POST", "/v1/load_lora_adapter",
                                  {"lora_name": "nw", "lora_path": "no-weights"})
        assert status == 400 and body["error"]["param"] == "lora_path"
        msg = body["error"]["message"]
        assert "weights file missing" in msg and "no-weights" in msg
        assert "adapter_model.safetensors" in msg and "adapter_model.bin" in msg
        assert "repo" not in msg.lower()  # not PEFT's Hub repo-id complaint
        loaded, skipped = server.load_adapter_dir()
        assert "no-weights" not in loaded and "weights file missing" in skipped["no-weights"]
    finally:
        shutil.rmtree(folder)


def test_serve_command_takes_the_limits_as_flags(tmp_path, monkeypatch):
    import argparse

    import posttrain.serve.server as server_mod
    from posttrain.cli.serve import add_commands

    p = argparse.ArgumentParser()
    add_commands(p.add_subparsers(dest="command"))
    args = p.parse_args(["serve", "--adapter-dir", str(tmp_path), "--header-timeout", "2", "--body-timeout", "3",
                         "--max-connections", "7"])
    seen = {}
    monkeypatch.setattr(server_mod, "serve", lambda **kw: seen.update(kw) or 0)
    assert args.func(args) == 0
    assert (seen["header_timeout_s"], seen["body_timeout_s"], seen["max_connections"]) == (2.0, 3.0, 7)
    defaults = p.parse_args(["serve", "--adapter-dir", str(tmp_path)])
    assert (defaults.header_timeout, defaults.body_timeout, defaults.max_connections) == (10.0, 10.0, 128)
