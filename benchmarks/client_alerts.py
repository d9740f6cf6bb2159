"""The loop hears its alerts: from ``record()`` of a NaN step to the alert, and from the NaN step to the stop.

    python benchmarks/client_alerts.py [--quick] [--trials 100] [--ranks 4]

A real sidecar (a subprocess) and, per trial, a new run of ``--ranks`` clients (``Telemetry`` with
``stop_on={"nan_divergence"}``, real threads, real HTTP) driven in lockstep at 50 ms steps, as DDP
ranks are. At a random step rank 1 records a NaN loss. Measured, on CLOCK_MONOTONIC from just before
that ``record()`` call:

- NaN record() -> alert at the sidecar: a poller thread asks ``GET /v1/alerts?run=...&state=firing``
  every 2 ms (an upper bound: it includes up to 2 ms of polling and the poll's own request);
- NaN record() -> heard by the rank that sent it (``on_alert``: the answer to its urgent send);
- NaN record() -> heard by every rank (the last rank's ``on_alert``: the long poll);
- the stop distance: ``should_stop`` turns true at (stop step - NaN step) steps, the same on every rank.

Goals (issue 15): NaN -> alert p99 <= 50 ms; the stop at most 3 steps after the NaN at 50 ms steps.
The float fast path of ``record()`` (<= 3 us) is measured by benchmarks/client_cost.py.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Figure, Sidecar, table  # noqa: E402

STEP_SECONDS = 0.05


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs) + 0.5) - 1))]


def _poll_alert(url: str, run: str, t0_box: list[float], out: list[float], done: threading.Event) -> None:
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=10)
    while not done.is_set():
        conn.request("GET", f"/v1/alerts?run={run}&state=firing&limit=5")
        alerts = json.loads(conn.getresponse().read())["alerts"]
        if alerts and t0_box:
            out.append(time.monotonic() - t0_box[0])
            break
        time.sleep(0.002)
    conn.close()


def trial(url: str, n: int, ranks: int, rng: random.Random) -> dict[str, float]:
    from trainhealth.trainer.client import Telemetry

    run = f"bench-stop-{n}-{time.time_ns()}"
    heard: dict[int, float] = {}
    t0_box: list[float] = []
    lock = threading.Lock()

    def on_alert(rank: int) -> Any:
        def hear(alert: dict[str, Any]) -> None:
            with lock:
                if t0_box and rank not in heard:
                    heard[rank] = time.monotonic() - t0_box[0]
        return hear

    clients = [Telemetry(url=url, run=run, rank=r, world_size=ranks, environ={}, probes=[],
                         stop_on={"nan_divergence"}, on_alert=on_alert(r)) for r in range(ranks)]
    at_sidecar: list[float] = []
    done = threading.Event()
    poller = threading.Thread(target=_poll_alert, args=(url, run, t0_box, at_sidecar, done), daemon=True)
    nan_step = rng.randint(8, 14)
    stops: dict[int, int] = {}
    next_t = time.monotonic()
    try:
        for step in range(1, nan_step + 40):
            next_t += STEP_SECONDS
            time.sleep(max(0.0, next_t - time.monotonic()))
            for rank, tm in enumerate(clients):
                if rank in stops:
                    continue
                bad = rank == 1 and step == nan_step
                if bad:
                    poller.start()
                    t0_box.append(time.monotonic())
                tm.record(step, loss=math.nan if bad else 1.0 / step, grad_norm=1.0, lr=0.1)
                if tm.should_stop(step):
                    stops[rank] = step
            if len(stops) == ranks:
                break
    finally:
        done.set()
        for tm in clients:
            tm.close(timeout=2.0)
    if len(stops) != ranks or len(set(stops.values())) != 1:
        raise RuntimeError(f"trial {n}: ranks stopped at {stops} (NaN at {nan_step})")
    if len(heard) != ranks or not at_sidecar:
        raise RuntimeError(f"trial {n}: heard by {sorted(heard)}, at the sidecar: {at_sidecar}")
    return {"sidecar": at_sidecar[0], "own": heard[1], "all": max(heard.values()),
            "distance": stops[0] - nan_step}


def run(quick: bool = False, n: int | None = None, ranks: int = 4) -> list[Figure]:
    n = n or (20 if quick else 100)
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        sidecar = Sidecar("--db", str(Path(tmp) / "stop.db"))
        try:
            results = [trial(sidecar.url, i, ranks, rng) for i in range(n)]
        finally:
            sidecar.proc.terminate()
            sidecar.proc.wait(10)
    detail = {"trials": n, "ranks": ranks, "step_seconds": STEP_SECONDS}
    figures = []
    for key, name, goal in (("sidecar", "NaN record() -> alert at the sidecar", 50.0),
                            ("own", "NaN record() -> heard by its rank", None),
                            ("all", "NaN record() -> heard by every rank", None)):
        xs = [r[key] * 1e3 for r in results]
        figures.append(Figure("client_alerts", f"{name}, p50", statistics.median(xs), "ms", None, "<", detail))
        figures.append(Figure("client_alerts", f"{name}, p99", percentile(xs, 99), "ms", goal, "<",
                              {**detail, "max_ms": max(xs)}))
    distances = [r["distance"] for r in results]
    figures.append(Figure("client_alerts", "NaN step -> stop step (every rank the same), max", max(distances),
                          "steps", 4, "<", {**detail, "histogram": {d: distances.count(d) for d in set(distances)}}))
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--trials", type=int)
    ap.add_argument("--ranks", type=int, default=4)
    args = ap.parse_args()
    print(table(run(args.quick, args.trials, args.ranks)))


if __name__ == "__main__":
    main()
