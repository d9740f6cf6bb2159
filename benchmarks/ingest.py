"""Ingest throughput: the sidecar over HTTP (keep-alive, separate client process) vs the same
pipeline called in-process on the same bodies (the limit), and replay throughput.

    python benchmarks/ingest.py [--seconds 3]

The server is pinned to core 0 and the client to core 1 where the machine has two cores.
"""

from __future__ import annotations

import argparse
import http.client
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from urllib.parse import urlparse

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import ROOT, batches, pin, report, sample, start_sidecar  # noqa: E402


def in_process(bodies: list[bytes], seconds: float) -> float:
    from monitor.config import load
    from monitor.service import Service

    service = Service(load(None, {}, {}))
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for body in bodies:
            ans = service.ingest(body, "application/json")
            n += ans.body["accepted"]
    return n / (time.perf_counter() - t0)


def _client(url: str, bodies: list[bytes], seconds: float, out: mp.Queue) -> None:
    pin(1)
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port)
    headers = {"content-type": "application/json"}
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for body in bodies:
            conn.request("POST", "/v1/ingest", body, headers)
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200, resp.status
            n += 1
    out.put((n, time.perf_counter() - t0))


def over_http(url: str, bodies: list[bytes], size: int, seconds: float) -> float:
    q: mp.Queue = mp.Queue()
    p = mp.Process(target=_client, args=(url, bodies, seconds, q))
    p.start()
    n, dt = q.get()
    p.join()
    return n * size / dt


def replay_rate(n: int) -> float:
    import json

    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as fh:
        for i in range(n):
            fh.write(json.dumps(sample("replay", i % 64, i // 64)) + "\n")
        path = fh.name
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "monitor", "replay", path], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    dt = time.perf_counter() - t0
    os.unlink(path)
    return n / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--replay-records", type=int, default=500_000)
    args = ap.parse_args()
    rows = []
    proc, url = start_sidecar("--db", os.path.join(tempfile.mkdtemp(), "bench.db"))
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(proc.pid, {0})
    try:
        for size in (1, 100, 1000):
            bodies = batches(max(1, 2000 // size), size)
            pin(0)
            limit = in_process(bodies, args.seconds)
            http_rate = over_http(url, bodies, size, args.seconds)
            rows.append({"batch": size, "http_records_s": http_rate, "in_process_records_s": limit,
                         "http_vs_limit": http_rate / limit, "http_requests_s": http_rate / size})
    finally:
        proc.terminate()
        proc.wait()
    report("ingest", rows)
    rate = replay_rate(args.replay_records)
    report("replay", [{"records": args.replay_records, "replay_records_s": rate}])


if __name__ == "__main__":
    main()
