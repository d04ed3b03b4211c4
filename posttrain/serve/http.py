"""HTTP plumbing under the server: reading requests within limits, JSON replies, noticing a client has gone.

The stdlib server runs one thread per connection and, left alone, waits on a silent client forever. Here: a cap on
open connections (past it, a 503 from one refusing thread), a deadline for the request line and headers and another
for the body (each on the whole phase, not on each read, so a client sending a byte at a time cannot stretch it),
a body size limit, a JSON nesting limit, and a cheap test of whether the client hung up while its answer is made.
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import queue
import select
import socket
import threading
import time
from abc import ABCMeta, abstractmethod
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterable

from posttrain.serve.api import ServeError

log = logging.getLogger("posttrain.serve")


@dataclass(frozen=True)
class Limits:
    header_timeout_s: float = 10.0  # request line + headers; also how long an idle keep-alive connection is kept
    body_timeout_s: float = 10.0
    write_timeout_s: float = 600.0  # one blocked write of the answer (a client that stopped reading)
    max_connections: int = 128
    max_body_bytes: int = 8 << 20
    max_json_depth: int = 32  # an OpenAI request nests 5 deep (body, messages, message, content parts, part)


class ClientGone(Exception):
    """The client closed its connection; there is no one left to answer."""


class LimitedHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with at most ``limits.max_connections`` connections (a thread each) open at once."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], limits: Limits):
        self.limits = limits
        self._open = 0
        self._open_lock = threading.Lock()
        self._refuser = _Refuser()  # before binding: a failed bind calls server_close, which stops it
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:
        with self._open_lock:
            full = self._open >= self.limits.max_connections
            if not full:
                self._open += 1
        if full:
            self._refuser.refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: nothing else will give the slot back
            self._release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self) -> None:
        with self._open_lock:
            self._open -= 1

    def server_close(self) -> None:
        super().server_close()
        self._refuser.stop()


class _Refuser:
    """Answers connections past the cap with a 503, one at a time on a thread of its own: neither the accept loop
    nor a thread per refused connection waits on slow clients, and a flood past ``pending`` is dropped unanswered."""

    def __init__(self, pending: int = 64, wait_s: float = 0.2):
        self._queue: queue.Queue = queue.Queue()
        self._pending, self._wait_s = pending, wait_s
        body = json.dumps(ServeError(503, "too many open connections; retry shortly",
                                     code="too_many_connections").body()).encode()
        self._response = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\nRetry-After: 1\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        self._thread = threading.Thread(target=self._run, name="posttrain-serve-refuser", daemon=True)
        self._thread.start()

    def refuse(self, sock: socket.socket) -> None:
        if self._queue.qsize() >= self._pending:
            sock.close()
        else:
            self._queue.put(sock)

    def stop(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        while (sock := self._queue.get()) is not None:
            try:
                # Read the request before answering and until the client closes after: closing a socket with unread
                # input makes the kernel reset the connection, and the client may then lose the 503.
                sock.settimeout(self._wait_s)
                try:
                    sock.recv(1 << 16)
                except TimeoutError:  # it has sent nothing yet: answer anyway
                    pass
                sock.sendall(self._response)
                sock.shutdown(socket.SHUT_WR)
                deadline = time.monotonic() + self._wait_s
                while time.monotonic() < deadline and sock.recv(1 << 16):
                    pass
            except OSError:
                pass
            finally:
                sock.close()


class _DeadlineReader(io.RawIOBase):
    """The connection's input. While ``deadline`` (time.monotonic) is set, reads fail with TimeoutError once it has
    passed."""

    def __init__(self, sock: socket.socket):
        self.sock, self.deadline = sock, None

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("read deadline passed")
            self.sock.settimeout(left)
        return self.sock.recv_into(buf)


def peer_closed(sock: socket.socket) -> bool:
    """Whether the client has hung up, found without taking anything it sent (it may have sent its next request).
    A client that only shuts its sending side and still reads looks the same; HTTP clients do not do that."""
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        if not poller.poll(0):
            return False
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except (OSError, ValueError):  # reset, or already closed
        return True


def key_ok(given: str, key: str) -> bool:
    """Whether ``given`` is the key, compared in constant time so that timing shows nothing about the key."""
    return hmac.compare_digest(given.encode(), key.encode())


def bearer_ok(header: str | None, key: str | None) -> bool:
    """Whether an Authorization header is exactly ``Bearer KEY`` (the scheme's case aside, RFC 7235); any header
    passes when there is no key."""
    if key is None:
        return True
    scheme, _, given = (header or "").partition(" ")
    same = key_ok(given, key)  # compared even when the scheme is wrong, so timing shows nothing either way
    return scheme.lower() == "bearer" and same


def _too_deep(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        children = v.values() if isinstance(v, dict) else v
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def parse_json(raw: bytes, max_depth: int) -> Any:
    """The body as JSON, or a 400. The depth limit keeps deep structures away from everything downstream; json's own
    recursion error (past ~1000 levels) becomes the same 400 instead of a 500."""
    too_deep = ServeError(400, f"the request body nests deeper than {max_depth} levels")
    try:
        body = json.loads(raw or b"null")
    except RecursionError:
        raise too_deep from None
    except ValueError as exc:
        raise ServeError(400, f"the request body is not valid JSON: {exc}") from exc
    if isinstance(body, (dict, list)) and _too_deep(body, max_depth):
        raise too_deep
    return body


class JSONHandler(BaseHTTPRequestHandler, metaclass=ABCMeta):
    """Reads each request within the server's limits and answers in JSON; a subclass routes in ``dispatch``."""

    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse one connection per thread

    @property
    def limits(self) -> Limits:
        return self.server.limits

    @abstractmethod
    def dispatch(self, method: str) -> None:
        """Answer one request of HTTP ``method`` (the server's routes)."""

    def __getattr__(self, name: str):
        # The stdlib answers a method it finds no do_<METHOD> for with an HTML 501; every method goes to dispatch
        # instead, which refuses the unsupported ones with a JSON 405 and an Allow header.
        if name.startswith("do_"):
            return lambda: self.dispatch(name[3:])
        raise AttributeError(name)

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the stdlib's reader has no deadline, and would keep the socket open after close()
        self._reader = _DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self) -> None:
        # The wait for a keep-alive connection's next request counts: an idle connection holds a slot under the cap.
        # On the deadline the stdlib closes the connection (its TimeoutError handler).
        self._reader.deadline = time.monotonic() + self.limits.header_timeout_s
        super().handle_one_request()

    def read_body(self) -> bytes:
        """The body, within the size limit and the body deadline. A refusal closes the connection: an unread or
        half-read body would be taken for the next request."""
        try:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                self.close_connection = True
                raise ServeError(411, "chunked request bodies are not supported; send Content-Length")
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if length < 0:
                self.close_connection = True
                raise ServeError(400, "bad Content-Length header")
            limit = self.limits.max_body_bytes
            if length > limit:
                self.close_connection = True
                raise ServeError(413, f"the request body is {length} bytes; the limit is {limit}")
            if length == 0:
                return b""
            self._reader.deadline = time.monotonic() + self.limits.body_timeout_s
            try:
                data = self.rfile.read(length)
            except TimeoutError:
                self.close_connection = True
                raise ServeError(408, f"the request body ({length} bytes) did not arrive within "
                                      f"{self.limits.body_timeout_s:g} s") from None
            if len(data) < length:
                self.close_connection = True
                raise ClientGone()
            return data
        finally:
            # From here on the socket only writes: a client that stops reading its answer is dropped after the
            # write timeout instead of holding its thread.
            self._reader.deadline = None
            self.connection.settimeout(self.limits.write_timeout_s)

    def send_json(self, status: int, obj: dict, allow: Iterable[str] | None = None) -> None:
        self.send_bytes(status, json.dumps(obj).encode(), "application/json", allow=allow)

    def send_bytes(self, status: int, data: bytes, content_type: str, allow: Iterable[str] | None = None,
                   headers: dict[str, str] | None = None) -> None:
        """One whole answer of ``content_type`` (JSON, or the UI's pages and pictures)."""
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            if allow:
                self.send_header("Allow", ", ".join(allow))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":  # a HEAD answer has headers only; a body would be read as the next response
                self.wfile.write(data)
        except OSError:
            self.close_connection = True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # The stdlib's own refusals (bad request line, oversized headers, bad version), in the server's JSON shape.
        # The request could not be read, so neither can whatever follows it on the connection.
        self.close_connection = True
        self.send_json(code, ServeError(code, message or self.responses.get(code, ("error",))[0]).body())

    def write_chunk(self, data: bytes) -> None:
        """One chunk of a chunked (streamed) answer; ClientGone when the write fails."""
        try:
            self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        except OSError as exc:
            raise ClientGone() from exc

    def send_event(self, obj: dict | str) -> None:
        self.write_chunk(f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode())

    def log_message(self, fmt: str, *args) -> None:
        log.debug("%s %s", self.address_string(), fmt % args)
