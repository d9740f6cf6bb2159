"""What the live page costs ingest: the history ring on the hot path, and a page open and refreshing.

    python benchmarks/page_cost.py [--quick]

- Ring on the hot path: ``Service.ingest`` in-process on 64-rank batches of 100, with each rank's history
  ring (history.py) as shipped and with ``RankHistory.add`` replaced by a no-op; records per CPU-second,
  best of a few passes each, interleaved. Plus ``RankHistory.add`` alone (ns per call) and its memory.
- A page open: the real sidecar takes batches of 100 from 16 keep-alive connections (16 runs of 64 ranks)
  for a few windows without a page and a few with one refreshing (GET /?part=live for the newest run,
  64 ranks x 240 points, every ``--period`` seconds: 1 s, five times as often as the page's 5 s),
  alternated; records per sidecar CPU-second and per wall second. The page's own answer time and size
  are reported beside them.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import threading
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Feed, Figure, Sidecar, table  # noqa: E402
from benchmarks.loadgen import run_load  # noqa: E402


def ring_in_process(passes: int, records: int, tmp: str) -> tuple[float, float]:
    """Records per CPU-second of Service.ingest with the ring, and with RankHistory.add a no-op."""
    from trainhealth.config import load
    from trainhealth.history import RankHistory
    from trainhealth.service import Service

    real_add = RankHistory.add
    best = {"ring": 0.0, "none": 0.0}
    for k in range(passes):
        for mode in ("ring", "none"):
            RankHistory.add = real_add if mode == "ring" else (lambda self, rec: None)  # type: ignore[method-assign]
            try:
                service = Service(load(None, {"db": os.path.join(tmp, f"ring{k}{mode}.db")}, {}))
                feeds = [Feed(f"ring-{j}") for j in range(4)]
                bodies = [feeds[i % 4].body(100) for i in range(records // 100)]
                gc.collect()
                c0 = time.process_time()
                for body in bodies:
                    service.ingest(body, "application/json")
                best[mode] = max(best[mode], records / (time.process_time() - c0))
                service.close()
            finally:
                RankHistory.add = real_add  # type: ignore[method-assign]
    return best["ring"], best["none"]


def add_cost() -> tuple[float, int]:
    """ns per RankHistory.add of a full sample, and bytes a full ring holds."""
    from trainhealth.history import RankHistory
    from trainhealth.record import Record

    rec = Record(run="r", rank=0, time=1.7e9, step=10, loss=2.0, lr=0.1, grad_norm=1.0,
                 gpu_mem_peak_bytes=7e10, host_mem_bytes=3e10)
    h = RankHistory()
    n = 200_000
    per = min(timeit.repeat(lambda: h.add(rec), number=n, repeat=3)) / n
    return per * 1e9, h.rows.buffer_info()[1] * h.rows.itemsize


class Poller(threading.Thread):
    """A page left open: GET /?part=live every ``period`` seconds (what page.js does every 5 s)."""

    def __init__(self, url: str, period: float) -> None:
        super().__init__(daemon=True)
        self.url, self.period = url, period
        self.stop = threading.Event()
        self.seconds: list[float] = []
        self.bytes = 0

    def run(self) -> None:
        import httpx

        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.stop.is_set():
                t0 = time.perf_counter()
                answer = client.get("/?part=live")
                self.seconds.append(time.perf_counter() - t0)
                answer.raise_for_status()
                self.bytes = len(answer.content)
                self.stop.wait(max(0.0, self.period - (time.perf_counter() - t0)))


def http_windows(sidecar: Sidecar, seconds: float, rounds: int, period: float) -> dict[str, object]:
    rates: dict[str, list[float]] = {"without": [], "with": []}
    walls: dict[str, list[float]] = {"without": [], "with": []}
    poll_seconds: list[float] = []
    size = 0
    for _ in range(rounds):
        for mode in ("without", "with"):
            poller = Poller(sidecar.url, period) if mode == "with" else None
            if poller:
                poller.start()
            result = run_load(sidecar.url, 100, [0.5, seconds], 16, "page", None, sidecar.proc.pid)
            if poller:
                poller.stop.set()
                poller.join()
                poll_seconds += poller.seconds
                size = poller.bytes
            if result["errors"]:
                raise RuntimeError(f"{result['errors']} ingest requests failed")
            w = result["windows"][1]
            rates[mode].append(w["requests"] * 100 / w["server_cpu_seconds"])
            walls[mode].append(w["requests"] * 100 / w["seconds"])
    return {"rates": rates, "walls": walls, "poll_seconds": poll_seconds, "page_bytes": size}


def run(quick: bool = False, period: float = 1.0) -> list[Figure]:
    figures = []
    with tempfile.TemporaryDirectory() as tmp:
        ring, none = ring_in_process(2 if quick else 3, 20_000 if quick else 60_000, tmp)
        figures.append(Figure("page", "ingest in-process, history ring on", ring, "records/s", None, ">=",
                              {"per": "CPU-second", "batch": 100}))
        figures.append(Figure("page", "ingest in-process, history ring off", none, "records/s", None, ">=",
                              {"per": "CPU-second", "batch": 100}))
        figures.append(Figure("page", "history ring cost at full ingest speed", (none / ring - 1) * 100, "%",
                              None, "<", {"note": "share of the in-process maximum; at 640 records/s "
                                                  "(64 ranks x 10/s) it is RankHistory.add x 640 per second"}))
        ns, ring_bytes = add_cost()
        figures.append(Figure("page", "RankHistory.add", ns, "ns", 1000.0, "<"))
        figures.append(Figure("page", "history ring per rank, full", ring_bytes / 1024, "KiB", None, "<"))
        sidecar = Sidecar("--db", os.path.join(tmp, "page.db"))
        try:
            got = http_windows(sidecar, 1.5 if quick else 3.0, 2 if quick else 3, period)
        finally:
            sidecar.stop()
    rates, walls = got["rates"], got["walls"]
    assert isinstance(rates, dict) and isinstance(walls, dict)
    without, with_page = max(rates["without"]), max(rates["with"])
    figures.append(Figure("page", "HTTP ingest, no page open", without, "records/s", None, ">=",
                          {"per": "sidecar CPU-second", "batch": 100, "wall_records_s": max(walls["without"])}))
    figures.append(Figure("page", f"HTTP ingest, page refreshing every {period:g} s", with_page, "records/s",
                          None, ">=", {"per": "sidecar CPU-second", "batch": 100,
                                       "wall_records_s": max(walls["with"])}))
    figures.append(Figure("page", "ingest with a page open / without", with_page / without, "ratio", 0.95, ">="))
    polls = got["poll_seconds"]
    assert isinstance(polls, list)
    figures.append(Figure("page", "GET /?part=live under load (64 ranks x 240 points), median",
                          statistics.median(polls) * 1000, "ms", None, "<",
                          {"max_ms": max(polls) * 1000, "answers": len(polls), "bytes": got["page_bytes"]}))
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--period", type=float, default=1.0, help="seconds between page refreshes (page.js: 5)")
    args = ap.parse_args()
    print(table(run(args.quick, args.period)))


if __name__ == "__main__":
    main()
