"""Headless Chromium driven over the DevTools protocol (CDP): load a page, read its DOM, catch console
errors and uncaught exceptions, list the requests it made, take screenshots.

Debian's chromium (``need_binary("chromium")``), no browser download, no extra package: the protocol is
JSON over a WebSocket (the ``websockets`` package uvicorn[standard] already brings).
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import connect

from tests.conftest import stop_process

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--remote-debugging-port=0"]


class Browser:
    def __init__(self, binary: str, profile: Path, width: int = 1400, height: int = 1000,
                 flags: tuple[str, ...] = ()) -> None:
        """``flags``: more command-line switches (``--host-resolver-rules=...``)."""
        self.proc = subprocess.Popen([binary, *FLAGS, *flags, f"--user-data-dir={profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.stderr: list[str] = []
        self.stack = contextlib.ExitStack()
        self.events: list[dict[str, Any]] = []
        self.next_id = 0
        try:
            self._connect(width, height)
        except BaseException:
            self.close()
            raise

    def _connect(self, width: int, height: int) -> None:
        base = self._devtools_url()
        deadline = time.monotonic() + 30
        target = None
        while target is None and time.monotonic() < deadline:
            pages = httpx.get(f"{base}/json/list", timeout=5).json()
            target = next((p for p in pages if p["type"] == "page"), None)
            time.sleep(0.1)
        assert target is not None, "chromium opened no page"
        self.ws = self.stack.enter_context(connect(target["webSocketDebuggerUrl"], max_size=None, open_timeout=30))
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                  mobile=False)

    def _devtools_url(self) -> str:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.stderr.append(line)
            m = re.search(r"DevTools listening on ws://([^/]+)/", line)
            if m:
                return f"http://{m.group(1)}"
        raise RuntimeError("chromium did not start:\n" + "".join(self.stderr[-30:]))

    def call(self, method: str, timeout: float = 60, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        ident = self.next_id
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if msg.get("id") == ident:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def pump(self, seconds: float) -> None:
        """Collect events for a while (the page's timers run meanwhile)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                self.events.append(json.loads(self.ws.recv(timeout=left)))
            except TimeoutError:
                return

    def open(self, url: str, timeout: float = 60) -> None:
        """Load ``url``; events (errors, requests) are this page's only: the previous page is left for a blank
        one first, so a request it had in flight (a refresh to a sidecar now stopped) is not counted here."""
        self._load("about:blank", timeout)
        self._load(url, timeout)

    def _load(self, url: str, timeout: float) -> None:
        self.events.clear()
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            assert time.monotonic() < deadline, f"{url} did not load"
            self.pump(0.2)

    def eval(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = self.eval(expression)
            if value:
                return value
            assert time.monotonic() < deadline, f"timed out waiting for {expression}"
            self.pump(0.25)

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and browser log errors (CSP violations, failed loads)."""
        out = []
        for e in self.events:
            method, p = e.get("method"), e.get("params", {})
            if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert", "warning"):
                out.append(f"console.{p['type']}: {[a.get('value', a.get('description')) for a in p['args']]}")
            elif method == "Runtime.exceptionThrown":
                out.append(f"exception: {p['exceptionDetails']}")
            elif method == "Log.entryAdded" and p["entry"]["level"] in ("error", "warning"):
                out.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
        return out

    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def screenshot(self, path: Path) -> Path:
        height = self.eval("Math.ceil(document.documentElement.scrollHeight)")
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                         clip={"x": 0, "y": 0, "width": 1400, "height": min(int(height), 6000), "scale": 1})
        path.write_bytes(base64.b64decode(data["data"]))
        return path

    def close(self) -> None:
        with contextlib.suppress(Exception):  # the socket may be gone with the process
            self.stack.close()
        stop_process(self.proc)
        if self.proc.stderr:
            self.proc.stderr.close()
