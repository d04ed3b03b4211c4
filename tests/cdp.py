"""Headless Chromium driven over the DevTools protocol (CDP) through a pipe, for the UI's browser tests: load a page,
run JavaScript in it (fill a form, click), wait for what it draws, take a screenshot. Stdlib only: with
--remote-debugging-pipe, Chromium reads commands from fd 3 and writes answers to fd 4, each a JSON text ended by a
NUL byte (no WebSocket client needed)."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or \
        (str(Path("/usr/bin/chromium")) if Path("/usr/bin/chromium").exists() else None)


class Browser:
    def __init__(self, binary: str, profile: Path, width: int = 1100, height: int = 900):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # Above 10, so the dup2 onto 3 and 4 below never overwrites one end with the other.
        ends = (fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10))
        os.close(to_chrome_r)
        os.close(from_chrome_w)

        def child() -> None:
            os.dup2(ends[0], 3)
            os.dup2(ends[1], 4)

        self.proc = subprocess.Popen(
            [binary, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", "--remote-debugging-pipe",
             "--no-first-run", f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"],
            pass_fds=(3, 4), preexec_fn=child, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        for fd in ends:
            os.close(fd)
        self._ids = iter(range(1, 1 << 30))
        self._replies: dict[int, queue.Queue] = {}
        self._lock = threading.Lock()
        self.errors: list[str] = []  # JavaScript exceptions the page threw (Runtime.exceptionThrown)
        threading.Thread(target=self._read, daemon=True).start()
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for method in ("Page.enable", "Runtime.enable"):
            self.send(method, session=True)
        self.send("Emulation.setDeviceMetricsOverride", session=True, width=width, height=height,
                  deviceScaleFactor=1, mobile=False)
        self.width = width

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._from_chrome, 1 << 16)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                if "id" in msg:
                    with self._lock:
                        q = self._replies.pop(msg["id"], None)
                    if q is not None:
                        q.put(msg)
                elif msg.get("method") == "Runtime.exceptionThrown":
                    details = msg["params"]["exceptionDetails"]
                    self.errors.append(str(details.get("exception", {}).get("description") or details.get("text")))

    def send(self, method: str, session: bool = False, timeout: float = 60.0, **params: Any) -> dict[str, Any]:
        msg_id = next(self._ids)
        q: queue.Queue = queue.Queue(1)
        with self._lock:
            self._replies[msg_id] = q
        msg = {"id": msg_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        reply = q.get(timeout=timeout)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def goto(self, url: str) -> None:
        # The old document answers until the new one replaces it: wait for one without the old one's mark.
        self.js("window.__leaving = true")
        self.send("Page.navigate", session=True, url=url)
        self.wait("!window.__leaving && document.readyState === 'complete'")

    def js(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", session=True, expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait(self, expression: str, timeout: float = 30.0) -> Any:
        """The value of ``expression`` once it is truthy (polled every 0.1 s); TimeoutError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                page = self.js("location.href + ': ' + document.body.innerText.slice(0, 2000)")
                raise TimeoutError(f"still false after {timeout:.0f} s: {expression}\n{page}\nerrors: {self.errors}")
            time.sleep(0.1)

    def screenshot(self, path: Path) -> Path:
        """The whole page (its full height) as a PNG."""
        height = int(self.js("Math.ceil(document.documentElement.scrollHeight)"))
        self.send("Emulation.setDeviceMetricsOverride", session=True, width=self.width, height=height,
                  deviceScaleFactor=1, mobile=False)
        data = self.send("Page.captureScreenshot", session=True, format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except Exception:  # noqa: BLE001 - it may be gone already
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_chrome, self._from_chrome):
            try:
                os.close(fd)
            except OSError:
                pass
