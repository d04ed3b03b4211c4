"""The UI's HTTP server: posttrain serve's stdlib plumbing (serve/http.py: connection cap, header and body
deadlines, body limit, JSON replies, the API key compared in constant time) with the UI's routes.

Who may use it: bound to a loopback address, anyone on this machine; on any other address only with an API key
(refused at start-up otherwise), sent as ``Authorization: Bearer KEY`` or through the login page's cookie. Two
more checks keep other web pages from driving it through a visitor's browser: a POST must be JSON (a cross-site
form cannot send that without a CORS preflight, which is never granted), and on loopback the Host header must
name loopback (a DNS-rebinding page sends its own domain's name).
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import threading
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from posttrain.errors import ConfigError
from posttrain.io import read_complete_jsonl
from posttrain.serve.api import ServeError
from posttrain.serve.http import ClientGone, JSONHandler, LimitedHTTPServer, Limits, bearer_ok, key_ok, parse_json
from posttrain.ui import browse
from posttrain.ui.chat import Playground
from posttrain.ui.launch import Check, FormError, Launcher
from posttrain.ui.pages import page_html, static_file

log = logging.getLogger("posttrain.ui")

COOKIE = "posttrain_ui"
_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
_PAGES = {"/": "runs", "/run": "run", "/compare": "compare", "/chat": "chat", "/launch": "launch", "/login": "login"}
_STATIC = {"ui.js": "text/javascript; charset=utf-8", "ui.css": "text/css; charset=utf-8"}


def is_loopback(host: str) -> bool:
    if host.strip("[]") in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost: it may resolve to anything


def check_exposure(host: str, api_key: str | None) -> None:
    """Refuse to listen beyond this machine without a key: the UI starts runs and reads the runs directory."""
    if not api_key and not is_loopback(host):
        raise ConfigError(f"--host {host} makes the UI reachable from other machines, and it starts training runs "
                          "and shows every run under --runs: give it --api-key KEY (or set POSTTRAIN_API_KEY), or "
                          "keep the default --host 127.0.0.1")


class UI:
    """The runs browser, compare, chat and launch pages over ``runs_dir``. ``check`` validates a config with its
    overrides (the CLI passes posttrain.config's loader); ``model`` is the chat's base (None: the embedded one)."""

    def __init__(self, runs_dir: str | Path, check: Check, *, host: str = "127.0.0.1", port: int = 7860,
                 api_key: str | None = None, model: str | None = None, examples_dir: str | Path | None = None,
                 dtype: str = "auto", chat_timeout_s: float = 600.0):
        check_exposure(host, api_key)
        self.runs_dir = Path(runs_dir).resolve()
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.api_key = api_key or None
        self.session = secrets.token_urlsafe(32)  # what the login cookie holds: the key itself never sits in one
        self.loopback = is_loopback(host)
        self.playground = Playground(self.runs_dir, model, dtype=dtype, timeout_s=chat_timeout_s)
        self.launcher = Launcher(self.runs_dir, examples_dir, check)
        limits = Limits(write_timeout_s=60.0, max_connections=64, max_body_bytes=1 << 20)
        self.httpd = LimitedHTTPServer((host, port), Handler, limits)
        self.httpd.app = self
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        host = self.httpd.server_address[0]
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    def start(self) -> "UI":
        """Serve from a background thread (tests); ``stop()`` ends it."""
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="posttrain-ui-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(10)
        self.httpd.server_close()
        self.playground.stop()

    def authorised(self, headers) -> bool:
        if self.api_key is None or bearer_ok(headers.get("Authorization"), self.api_key):
            return True
        from http.cookies import CookieError, SimpleCookie

        try:
            morsel = SimpleCookie(headers.get("Cookie") or "").get(COOKIE)
        except CookieError:
            return False
        return morsel is not None and key_ok(morsel.value, self.session)

    # ---- the JSON endpoints' answers (plain dicts and strings; the handler sends them) ----

    def runs(self) -> dict[str, Any]:
        folders = browse.run_folders(self.runs_dir)
        infos = [browse.run_info(name, folder, self.launcher.alive(name)).as_json() for name, folder in folders.items()]
        # A run the form started is listed at once, before its process has written config.yaml.
        for name, launch in self.launcher.launches.items():
            if name not in folders:
                infos.append({"name": name, "method": launch.argv[3], "status": launch.state()["status"],
                              "last_step": None, "key_metric": None, "key_value": None, "updated": launch.started})
        infos.sort(key=lambda r: r["updated"], reverse=True)
        return {"runs_dir": str(self.runs_dir), "runs": infos}

    def metrics(self, name: str, since: int) -> dict[str, Any]:
        folder = browse.resolve_run(self.runs_dir, name)
        info = browse.run_info(name, folder, self.launcher.alive(name))
        path = folder / browse.METRICS_FILE
        records = [r for r in (read_complete_jsonl(path) if path.is_file() else [])
                   if isinstance(r, dict) and isinstance(r.get("step"), (int, float)) and r["step"] > since]
        return {**info.as_json(), "records": records}

    def curves(self, name: str) -> str:
        from posttrain.report.run_page import curves_html

        return curves_html(browse.resolve_run(self.runs_dir, name), name)

    def summary(self, name: str) -> dict[str, Any]:
        from posttrain.report.compare import evals_table

        folder = browse.resolve_run(self.runs_dir, name)
        config = folder / browse.CONFIG_FILE
        return {"evals_html": evals_table({name: folder}) or
                '<p class="note">no held-out evaluation in summary.json yet</p>',
                "config": config.read_text() if config.is_file() else None}

    def compare(self, names: list[str]) -> str:
        from posttrain.report.compare import compare_body

        if not 2 <= len(names) <= 4:
            raise ServeError(400, f"compare takes 2 to 4 runs, got {len(names)}", param="run")
        runs = {n: browse.resolve_run(self.runs_dir, n) for n in names}
        try:
            return "\n".join(compare_body(runs, title="runs compared"))
        except (FileNotFoundError, ValueError) as exc:
            raise ServeError(400, str(exc), param="run") from None


class Handler(JSONHandler):
    server_version = "posttrain-ui"

    @property
    def app(self) -> UI:
        return self.server.app

    def dispatch(self, method: str) -> None:
        try:
            raw = self.read_body()
            url = urlsplit(self.path)
            path = unquote(url.path).rstrip("/") or "/"
            query = parse_qs(url.query)
            self._guard(method, path)
            method = "GET" if method == "HEAD" else method  # HEAD answers as GET, without the body (send_bytes)
            if method == "GET" and path in _PAGES:
                return self._page(path)
            if method == "GET" and path.startswith("/static/"):
                return self._static(path.removeprefix("/static/"))
            if not path.startswith("/api/"):
                raise ServeError(404, f"no page {path}")
            body = parse_json(raw, self.limits.max_json_depth) if method == "POST" else None
            self._api(method, path.removeprefix("/api"), query, body)
        except _Redirect as exc:
            self.send_bytes(303, b"", "text/plain", headers={"Location": exc.location})
        except ServeError as exc:
            self.send_json(exc.status, exc.body())
        except browse.RunNotFound as exc:
            self.send_json(404, ServeError(404, str(exc)).body())
        except ClientGone:
            self.close_connection = True
        except Exception as exc:
            log.exception("request failed")
            self.send_json(500, ServeError(500, f"internal error: {type(exc).__name__}: {exc}").body())

    def _guard(self, method: str, path: str) -> None:
        if method not in ("GET", "HEAD", "POST"):
            raise ServeError(405, f"method {method} is not supported")
        if self.app.loopback:
            host = (self.headers.get("Host") or "").rpartition(":")[0] or self.headers.get("Host") or ""
            if host.strip("[]") not in _LOOPBACK_NAMES:
                raise ServeError(403, f"Host {self.headers.get('Host')!r}: this UI answers loopback names only")
        if method == "POST" and not (self.headers.get("Content-Type") or "").startswith("application/json"):
            raise ServeError(415, "POST bodies must be application/json")
        if path in ("/login", "/api/login") or path.startswith("/static/") or self.app.authorised(self.headers):
            return
        if method == "GET" and path in _PAGES:
            raise _Redirect("/login")
        raise ServeError(401, "missing or wrong API key: log in at /login or send 'Authorization: Bearer <key>'",
                         code="invalid_api_key")

    def _page(self, path: str) -> None:
        self.send_bytes(200, page_html(_PAGES[path]).encode(), "text/html; charset=utf-8",
                        headers={"Cache-Control": "no-store"})

    def _static(self, name: str) -> None:
        if name == "report.css":
            from posttrain.report.html import CSS

            return self.send_bytes(200, CSS.encode(), "text/css; charset=utf-8")
        if name not in _STATIC:
            raise ServeError(404, f"no file {name}")
        self.send_bytes(200, static_file(name), _STATIC[name])

    def _api(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> None:
        app = self.app
        if (method, path) == ("POST", "/login"):
            return self._login(body)
        if method == "GET" and path == "/runs":
            return self.send_json(200, app.runs())
        if method == "GET" and path.startswith("/runs/"):
            name, _, what = path.removeprefix("/runs/").rpartition("/")
            if what == "metrics":
                since = query.get("since", ["-1"])[0]
                try:
                    since_step = int(float(since))
                except ValueError:
                    raise ServeError(400, f"since={since!r} is not a step number", param="since") from None
                return self.send_json(200, app.metrics(name, since_step))
            if what == "curves":
                return self.send_bytes(200, app.curves(name).encode(), "text/html; charset=utf-8")
            if what == "summary":
                return self.send_json(200, app.summary(name))
        if method == "GET" and path == "/compare":
            return self.send_bytes(200, app.compare(query.get("run", [])).encode(), "text/html; charset=utf-8")
        if method == "GET" and path == "/models":
            return self.send_json(200, {"models": app.playground.models()})
        if (method, path) == ("POST", "/chat"):
            return self.send_json(200, app.playground.chat(body))
        if method == "GET" and path == "/launch/options":
            return self.send_json(200, {"examples": app.launcher.examples(), "configs": app.launcher.config_files()})
        if (method, path) == ("POST", "/launch"):
            try:
                launch = app.launcher.start(body)
            except FormError as exc:
                raise ServeError(400, str(exc)) from None
            return self.send_json(200, launch.state())
        if method == "GET" and path == "/launches":
            launches = sorted(app.launcher.launches.values(), key=lambda launch: launch.started, reverse=True)
            return self.send_json(200, {"launches": [launch.state() for launch in launches]})
        if method == "POST" and path.startswith("/launches/") and path.endswith("/stop"):
            name = path.removeprefix("/launches/").removesuffix("/stop")
            return self.send_json(200, app.launcher.stop(name).state())
        raise ServeError(404, f"no endpoint {method} /api{path}")

    def _login(self, body: Any) -> None:
        key = body.get("key") if isinstance(body, dict) else None
        if self.app.api_key is None:
            return self.send_json(200, {"ok": True})
        if not isinstance(key, str) or not key_ok(key, self.app.api_key):
            raise ServeError(401, "wrong API key", code="invalid_api_key")
        cookie = f"{COOKIE}={self.app.session}; Path=/; HttpOnly; SameSite=Strict"
        self.send_bytes(200, b'{"ok": true}', "application/json", headers={"Set-Cookie": cookie})

class _Redirect(Exception):
    def __init__(self, location: str):
        super().__init__(location)
        self.location = location
