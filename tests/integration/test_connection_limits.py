"""1,000 idle connections against the real sidecar, run with a 256-descriptor limit: /healthz and
ingest keep answering (the longest-idle connection makes room; header and keep-alive timeouts)."""

from __future__ import annotations

import os
import re
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.conftest import ROOT
from tests.integration.alerting import config

pytestmark = pytest.mark.integration

FD_LIMIT = 256


def _low_fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


@pytest.fixture
def sidecar_url(tmp_path: Path) -> Iterator[str]:
    cfg = config(tmp_path, "[server]\nheader_timeout_seconds = 2\nkeep_alive_seconds = 2\nbody_timeout_seconds = 3\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINHEALTH_")}
    proc = subprocess.Popen([sys.executable, "-m", "trainhealth", "serve", "--port", "0", "--config", cfg,
                             "--db", str(tmp_path / "t.db")], cwd=tmp_path,
                            env={**env, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_low_fd_limit)
    assert proc.stderr is not None
    url = None
    for _ in range(50):
        m = re.search(r"listening on (http://\S+)", proc.stderr.readline())
        if m:
            url = m.group(1)
            break
    assert url, "the sidecar did not start"
    yield url
    proc.terminate()
    proc.wait(10)
    proc.stderr.close()


def idle_sockets(url: str, n: int) -> list[socket.socket]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    out = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex((host, int(port)))
        out.append(s)
    return out


def test_thousand_idle_connections_leave_healthz_and_ingest_answering(sidecar_url: str) -> None:
    held = idle_sockets(sidecar_url, 1000)
    try:
        time.sleep(1.0)  # the sidecar accepts them all (and closes the oldest idle ones as it must)
        for i in range(5):
            with httpx.Client(base_url=sidecar_url, timeout=5) as client:
                assert client.get("/healthz").status_code == 200
                answer = client.post("/v1/ingest", json=[{"run": "busy", "rank": 0, "time": time.time(),
                                                          "step": i, "loss": 1.0}])
                assert answer.status_code == 200 and answer.json()["accepted"] == 1
            held += idle_sockets(sidecar_url, 100)  # more keep coming
    finally:
        for s in held:
            s.close()
    with httpx.Client(base_url=sidecar_url, timeout=5) as client:
        assert client.get("/v1/runs/busy").json()["step"] == 4


def test_a_connection_that_sends_no_complete_headers_is_closed(sidecar_url: str) -> None:
    host, port = sidecar_url.removeprefix("http://").rsplit(":", 1)
    silent = socket.create_connection((host, int(port)))
    slow = socket.create_connection((host, int(port)))
    slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # ... and never the blank line
    for s in (silent, slow):
        s.settimeout(10)
        started = time.monotonic()
        assert s.recv(100) == b""  # closed by the sidecar (header timeout 2 s)
        assert time.monotonic() - started < 6
        s.close()
    kept = socket.create_connection((host, int(port)))
    kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    kept.settimeout(10)
    assert kept.recv(100).startswith(b"HTTP/1.1 200")
    started = time.monotonic()
    while kept.recv(1000):  # the rest of the answer, then the keep-alive timeout (2 s) closes it
        pass
    assert time.monotonic() - started < 6
    kept.close()


def test_binding_beyond_loopback_without_a_token_warns_at_start(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINHEALTH_")}
    for args, warned in ((["--host", "0.0.0.0"], True), (["--host", "0.0.0.0", "--token", "t0k3n-0123456789ab"], False),
                         (["--host", "127.0.0.1"], False)):
        proc = subprocess.Popen([sys.executable, "-m", "trainhealth", "serve", "--port", "0", *args,
                                 "--db", str(tmp_path / "w.db")], cwd=tmp_path,
                                env={**env, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        lines = [proc.stderr.readline() for _ in range(2)] if warned else [proc.stderr.readline()]
        proc.terminate()
        rest = proc.communicate(timeout=10)[1]
        text = "".join(lines) + rest
        assert "listening on" in text
        assert ("WARNING: 0.0.0.0 is reachable from other machines and no token is set" in text) is warned, text


def slow_bodies(url: str, n: int) -> list[socket.socket]:
    """Connections whose request headers are complete and whose body never is (one byte of 1,000 sent)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    out = []
    for _ in range(n):
        s = socket.create_connection((host, int(port)))
        out.append(s)
        try:
            s.sendall(b"POST /v1/ingest HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n[")
        except OSError:  # already closed by the sidecar to make room
            pass
    return out


def test_slow_bodies_time_out_and_make_room_at_the_cap(sidecar_url: str) -> None:
    (one,) = slow_bodies(sidecar_url, 1)
    one.settimeout(15)
    started = time.monotonic()
    answer = b""
    while chunk := one.recv(1000):
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 408") and b"body_timeout_seconds" in answer, answer
    assert time.monotonic() - started < 10
    one.close()
    held = slow_bodies(sidecar_url, 200)  # the cap is 256 - 128 descriptors: these take every slot
    try:
        for i in range(5):
            with httpx.Client(base_url=sidecar_url, timeout=5) as client:
                assert client.get("/healthz").status_code == 200
                answer = client.post("/v1/ingest", json=[{"run": "slow", "rank": 0, "time": time.time(),
                                                          "step": i, "loss": 1.0}])
                assert answer.status_code == 200 and answer.json()["accepted"] == 1
    finally:
        for s in held:
            s.close()
