"""The client against a real HTTP receiver (stdlib http.server on 127.0.0.1, an ephemeral port, in a thread)
that can be down, slow, or answer errors. The training thread must never block or see an exception, and
buffered records must arrive once the receiver is back."""

from __future__ import annotations

import json
import math
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from trainhealth.record import from_obj
from trainhealth.trainer.client import Telemetry

pytestmark = pytest.mark.integration

FAST = {"flush_seconds": 0.05, "backoff_seconds": 0.05, "max_backoff_seconds": 0.2, "heartbeat_seconds": 60.0}


class Receiver:
    """An ingest endpoint. ``status`` is what it answers; ``gate`` (when set) holds each request until
    released; ``sleep`` delays each answer."""

    def __init__(self, port: int = 0) -> None:
        self.bodies: list[bytes] = []
        self.headers: list[dict[str, str]] = []
        self.peers: set[tuple[str, int]] = set()
        self.status = 200
        self.sleep = 0.0
        self.gate: threading.Event | None = None
        self.got = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive

            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if receiver.gate is not None:
                    receiver.gate.wait(30)
                if receiver.sleep:
                    threading.Event().wait(receiver.sleep)
                status = receiver.status
                with receiver.got:
                    if status == 200:
                        receiver.bodies.append(body)
                        receiver.headers.append(dict(self.headers))
                        receiver.peers.add(self.client_address)
                    receiver.got.notify_all()
                reply = json.dumps({"accepted": 0}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def records(self) -> list[dict]:
        with self.got:
            return [r for body in self.bodies for r in json.loads(body)]

    def wait_for(self, predicate, timeout: float = 30.0) -> bool:
        with self.got:
            return self.got.wait_for(lambda: predicate([r for b in self.bodies for r in json.loads(b)]), timeout)

    def stop(self) -> None:
        if self.gate is not None:
            self.gate.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def telemetry(url: str, **kw) -> Telemetry:
    return Telemetry(url=url, run="it", rank=1, world_size=2, environ={}, probes=[], **{**FAST, **kw})


def steps(records: list[dict]) -> list[int]:
    return [r["step"] for r in records if r["type"] == "sample"]


def test_nan_arrives_as_nan_in_the_body_with_the_bearer_token(receiver):
    tm = telemetry(receiver.url, token="s3cret")
    try:
        tm.record(1, loss=math.nan, grad_norm=math.inf, lr=0.1)
        tm.record(2, loss=0.5, lr=0.1, metrics_x=-math.inf)
        assert tm.flush(30)
    finally:
        tm.close()
    body = b"".join(receiver.bodies)
    assert b'"loss":NaN' in body and b'"grad_norm":Infinity' in body and b'"metrics_x":-Infinity' in body
    first, second = (from_obj(r) for r in receiver.records)
    assert math.isnan(first.loss) and first.grad_norm == math.inf and second.metrics == {"metrics_x": -math.inf}
    assert receiver.headers[0]["Authorization"] == "Bearer s3cret"
    assert receiver.headers[0]["Content-Type"] == "application/json"


def test_batches_reuse_one_keep_alive_connection(receiver):
    tm = telemetry(receiver.url, batch_records=10)
    try:
        for step in range(1, 51):
            tm.record(step, loss=1.0)
        assert tm.flush(30)
    finally:
        tm.close()
    assert steps(receiver.records) == list(range(1, 51))
    assert len(receiver.bodies) >= 5 and len(receiver.peers) == 1


def test_sidecar_down_then_back_records_arrive_in_order():
    port = free_port()
    tm = telemetry(f"http://127.0.0.1:{port}")
    receiver = None
    try:
        for step in range(1, 201):
            tm.record(step, loss=float(step))  # nothing listens: must neither block nor raise
        assert not tm.flush(0.5)
        assert tm.stats()["failures"] >= 1 and tm.stats()["queued"] == 200
        receiver = Receiver(port)
        assert receiver.wait_for(lambda recs: len(recs) >= 200)
        assert steps(receiver.records) == list(range(1, 201))
    finally:
        tm.close()
        if receiver:
            receiver.stop()


def test_down_too_long_drops_the_oldest_and_says_how_many():
    port = free_port()
    tm = telemetry(f"http://127.0.0.1:{port}", capacity=50)
    receiver = None
    try:
        for step in range(1, 121):
            tm.record(step, loss=1.0)
        receiver = Receiver(port)
        assert receiver.wait_for(lambda recs: len(recs) >= 50)
        assert steps(receiver.records) == list(range(71, 121))
        tm.record(121, loss=1.0)  # samples from now on say how many were lost
        assert receiver.wait_for(lambda recs: 121 in steps(recs))
        assert receiver.records[-1]["metrics"] == {"client_dropped_records": 70}
    finally:
        tm.close()
        if receiver:
            receiver.stop()


def test_a_receiver_that_holds_requests_does_not_block_the_training_thread(receiver):
    receiver.gate = threading.Event()  # every request waits until the test releases it
    tm = telemetry(receiver.url, timeout_seconds=30.0)
    try:
        tm.record(1, loss=1.0)
        tm.flush(0.2)  # the sender is now stuck inside a request
        for step in range(2, 1002):
            tm.record(step, loss=1.0)  # returns while the sender is blocked
        assert tm.stats()["queued"] >= 1000
        receiver.gate.set()
        assert receiver.wait_for(lambda recs: len(recs) == 1001)
        assert steps(receiver.records) == list(range(1, 1002))
    finally:
        tm.close()


def test_slow_receiver_beyond_the_timeout_is_retried_without_raising(receiver):
    receiver.sleep = 0.6
    tm = telemetry(receiver.url, timeout_seconds=0.3)
    try:
        tm.record(1, loss=1.0)
        assert receiver.wait_for(lambda recs: len(recs) >= 1)  # a timed-out request may still land
        assert tm.stats()["failures"] >= 1
        receiver.sleep = 0.0
        tm.record(2, loss=2.0)
        assert receiver.wait_for(lambda recs: 2 in steps(recs))
        assert set(steps(receiver.records)) == {1, 2}  # delivered at least once (a retry may duplicate)
    finally:
        tm.close()


def test_server_errors_are_retried_until_the_records_get_through(receiver):
    receiver.status = 500
    tm = telemetry(receiver.url)
    try:
        for step in range(1, 11):
            tm.record(step, loss=1.0)
        assert not tm.flush(0.3)
        assert tm.stats()["failures"] >= 1
        receiver.status = 200
        assert receiver.wait_for(lambda recs: len(recs) >= 10)
        assert steps(receiver.records) == list(range(1, 11))
    finally:
        tm.close()


def test_bad_request_answers_drop_those_records_and_the_client_carries_on(receiver):
    receiver.status = 400
    tm = telemetry(receiver.url)
    try:
        tm.record(1, loss=1.0)
        assert tm.flush(30)  # settled: refused records are not retried
        assert tm.stats()["rejected"] == 1
        receiver.status = 200
        tm.record(2, loss=1.0)
        assert tm.flush(30)
        assert steps(receiver.records) == [2]
    finally:
        tm.close()


def test_heartbeats_arrive_while_the_training_thread_is_blocked(receiver):
    tm = telemetry(receiver.url, heartbeat_seconds=0.05)
    try:
        tm.record(17, loss=1.0)
        # the training thread blocks (as in a hung all-reduce) until heartbeats have reached the receiver
        assert receiver.wait_for(lambda recs: sum(r["type"] == "heartbeat" for r in recs) >= 3)
        beats = [r for r in receiver.records if r["type"] == "heartbeat"]
        assert {r["step"] for r in beats} == {17} and {r["rank"] for r in beats} == {1}
    finally:
        tm.close()


def test_close_with_the_sidecar_down_returns_and_counts_what_was_lost():
    tm = telemetry(f"http://127.0.0.1:{free_port()}")
    tm.record(1, loss=1.0)
    tm.close(timeout=1.0)
    assert tm.stats()["dropped"] == 1 and tm.stats()["queued"] == 0


# -- against the real sidecar (python -m trainhealth serve, the conftest fixture) ---------------------------

def test_a_nan_loss_sent_by_the_client_fires_on_the_real_sidecar(sidecar):
    tm = Telemetry(url=sidecar.url, run="client-job", rank=1, world_size=2, environ={}, **FAST)
    try:
        tm.start(batch_size=2, lr=0.005, reference_lr=0.02, reference_batch_size=16, warmup_steps=0)
        for step in range(1, 11):
            tm.record(step, loss=1.0 / step, lr=0.005, grad_norm=1.0)
        tm.record(11, loss=math.nan, lr=0.005, grad_norm=1.0)
        assert tm.flush(30)
    finally:
        tm.close()
    assert tm.stats()["rejected"] == 0
    alerts = sidecar.client.get("/v1/alerts", params={"run": "client-job", "state": "firing"}).json()["alerts"]
    assert [(a["alert"], a["rank"], a["step"]) for a in alerts] == [("nan_divergence", None, 11)]
    run = sidecar.client.get("/v1/runs/client-job").json()
    latest = run["rank_states"][0]["latest"]
    assert latest["loss"] == "NaN" and latest["host_mem_bytes"] > 0


def test_batches_too_large_for_the_real_sidecar_are_split_until_accepted(start_sidecar, tmp_path):
    cfg = tmp_path / "small.toml"
    cfg.write_text("[limits]\nmax_records_per_batch = 50\n")
    sc = start_sidecar("--config", str(cfg))
    tm = Telemetry(url=sc.url, run="split-job", rank=0, world_size=1, environ={},
                   **{**FAST, "batch_records": 500})
    try:
        for step in range(1, 201):
            tm.record(step, loss=1.0)
        assert tm.flush(30)
    finally:
        tm.close()
    assert tm.stats()["sent"] == 200 and tm.stats()["rejected"] == 0
    assert sc.client.get("/v1/runs/split-job").json()["step"] == 200
