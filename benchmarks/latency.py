"""Detection latency: from the POST that carries a NaN loss to the alert in /v1/alerts and at a webhook.

    python benchmarks/latency.py [--quick] [--trials 100]

The real sidecar runs with ``--webhook`` pointing at a receiver in another process, under a
background load of 64 ranks each POSTing one record every 100 ms (64 keep-alive connections,
640 records/s). Each trial sends one record with ``"loss": NaN`` (as Python's json writes it)
for a new rank of a separate run, then polls ``GET /v1/alerts?run=...&state=firing`` until the
alert shows; the receiver notes when the webhook arrives. Both clocks are CLOCK_MONOTONIC.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import queue
import random
import statistics
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Figure, Sidecar, table  # noqa: E402
from benchmarks.loadgen import PacedLoad  # noqa: E402

RUN = "latency"


def _receiver(port_out: Any, arrivals: Any) -> None:
    class Hook(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            now = time.monotonic()
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
            doc = json.loads(body)
            for alert in doc if isinstance(doc, list) else [doc]:
                if alert.get("run") == RUN and alert.get("state") == "firing":
                    arrivals.put((alert["rank"], now))

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    port_out.put(server.server_address[1])
    server.serve_forever()


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs) + 0.5) - 1))]


def trials(url: str, n: int, arrivals: Any) -> tuple[list[float], list[float]]:
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=10)
    visible, hooked = [], []
    rng = random.Random(0)
    for rank in range(n):
        time.sleep(rng.uniform(0.05, 0.15))  # independent trials, at random phases of the load
        body = json.dumps([{"run": RUN, "rank": rank, "time": time.time(), "step": 1, "loss": float("nan"),
                            "lr": 0.02, "grad_norm": 1.0}]).encode()  # bare NaN token, as json writes it
        t0 = time.monotonic()
        conn.request("POST", "/v1/ingest", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        answer = json.loads(resp.read())
        if resp.status != 200 or answer.get("alerts") != 1:
            raise RuntimeError(f"trial {rank}: ingest answered {resp.status} {answer}")
        while True:
            conn.request("GET", f"/v1/alerts?run={RUN}&state=firing&limit=5")
            resp = conn.getresponse()
            alerts = json.loads(resp.read())["alerts"]
            if any(a["rank"] == rank and a["alert"] == "nan_divergence" for a in alerts):
                visible.append(time.monotonic() - t0)
                break
            if time.monotonic() - t0 > 5:
                raise RuntimeError(f"trial {rank}: alert not visible in /v1/alerts after 5 s")
        while True:
            try:
                got, at = arrivals.get(timeout=5)
            except queue.Empty:
                raise RuntimeError(f"trial {rank}: no webhook within 5 s") from None
            if got == rank:
                hooked.append(at - t0)
                break
    conn.close()
    return visible, hooked


def run(quick: bool = False, n: int | None = None) -> list[Figure]:
    n = n or (30 if quick else 100)
    ctx = mp.get_context("spawn")
    port_q, arrivals = ctx.Queue(), ctx.Queue()
    receiver = ctx.Process(target=_receiver, args=(port_q, arrivals), daemon=True)
    receiver.start()
    hook_port = port_q.get(timeout=30)
    with tempfile.TemporaryDirectory() as tmp:
        sidecar = Sidecar("--db", os.path.join(tmp, "latency.db"), "--webhook",
                          f"http://127.0.0.1:{hook_port}/hook")
        load = None
        try:
            load = PacedLoad(sidecar.url, "background", ranks=64, rate=10.0)
            time.sleep(1.0)  # the load reaches its pace
            cpu0, t0 = sidecar.cpu_seconds(), time.monotonic()
            visible, hooked = trials(sidecar.url, n, arrivals)
            share = (sidecar.cpu_seconds() - cpu0) / (time.monotonic() - t0)
            sent = load.stop()
            load = None
        finally:
            if load is not None:
                load.stop()
            sidecar.stop()
            receiver.kill()
    background = sent["requests"] / sent["seconds"]
    detail = {"trials": n, "background_records_s": background, "background_errors": sent["errors"],
              "sidecar_core_share": share}
    figures = []
    for name, xs, goal in (("NaN POST -> visible in /v1/alerts", visible, 0.050),
                           ("NaN POST -> webhook received", hooked, 0.200)):
        p50, p99 = statistics.median(xs), percentile(xs, 99)
        figures.append(Figure("latency", f"{name}, p50", p50 * 1e3, "ms", None, "<", detail))
        figures.append(Figure("latency", f"{name}, p99", p99 * 1e3, "ms", goal * 1e3, "<",
                              {**detail, "max_ms": max(xs) * 1e3}))
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--trials", type=int)
    args = ap.parse_args()
    print(table(run(args.quick, args.trials)))


if __name__ == "__main__":
    main()
