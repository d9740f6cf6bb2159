"""For the alerting tests: a real webhook receiver, and helpers to raise alerts in a real sidecar.

The receiver is an HTTP server on 127.0.0.1 in a thread.

It records every request as it arrives (path, headers, body), answers
``status`` (``answered`` counts the answers written), can be held (requests wait until ``release()``: a slow receiver,
or one that is killed mid-delivery), and stopped and started again on the same
port (a receiver that is down for a while).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.perf_counter() on arrival

    @property
    def key(self) -> str:
        return self.headers.get("idempotency-key", "")

    def json(self) -> Any:
        return json.loads(self.body)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Receiver:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.received: list[Delivery] = []
        self.status = 200
        self.in_flight = 0
        self.answered = 0  # requests whose status line went out (the sender may have it, or have died)
        self._gate = threading.Event()
        self._gate.set()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # -- control ------------------------------------------------------------
    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver._lock:
                    headers = {k.lower(): v for k, v in self.headers.items()}
                    receiver.received.append(Delivery(self.path, headers, body, time.perf_counter()))
                    receiver.in_flight += 1
                try:
                    receiver._gate.wait(60)
                    self.send_response(receiver.status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    with receiver._lock:
                        receiver.answered += 1
                except OSError:  # the sender is gone (killed mid-delivery)
                    pass
                finally:
                    with receiver._lock:
                        receiver.in_flight -= 1

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def hold(self) -> None:
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    # -- reading ------------------------------------------------------------
    def deliveries(self, path: str | None = None) -> list[Delivery]:
        with self._lock:
            return [d for d in self.received if path is None or d.path == path]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 15.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what or predicate}; received: "
                                     f"{[(d.path, d.body[:120]) for d in self.deliveries()]}")
            time.sleep(0.05)

    def by_key(self, path: str | None = None) -> dict[str, list[Delivery]]:
        out: dict[str, list[Delivery]] = {}
        for d in self.deliveries(path):
            out.setdefault(d.key, []).append(d)
        return out


def nan_records(run: str, ranks: range | list[int], step: int = 10) -> list[dict[str, Any]]:
    now = time.time()
    return [{"run": run, "rank": rank, "time": now, "step": step, "loss": float("nan")} for rank in ranks]


def oom_records(run: str, ranks: range | list[int], step: int = 10) -> list[dict[str, Any]]:
    """A per-rank alert (gpu_oom) for each rank: nan_divergence is one alert per run."""
    now = time.time()
    return [{"type": "oom", "run": run, "rank": rank, "time": now, "step": step, "message": "CUDA out of memory"}
            for rank in ranks]


def ingest(sidecar: Any, records: list[dict[str, Any]]) -> dict[str, Any]:
    resp = sidecar.client.post("/v1/ingest", content=json.dumps(records),
                               headers={"Content-Type": "application/json"})
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "trainhealth.toml"
    path.write_text(text)
    return str(path)


def until(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "") -> None:
    """Poll ``predicate`` every 50 ms until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
