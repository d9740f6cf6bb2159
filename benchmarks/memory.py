"""Sidecar memory: RSS after 10^4 ... 10^7 records from 64 ranks (goal: flat once windows are full).

    python benchmarks/memory.py [--quick] [--max 10000000]

A child process builds the sidecar's Service with its store attached (as ``serve`` does, without
the HTTP server) and feeds it a healthy 64-rank run through ``Service.ingest`` in JSON bodies of
1000 records (encoded on the fly; steps and times advance). RSS is read after each power of ten.
Then the cost of width: RSS added per rank with 4,096 ranks (1,024 with --quick) of 200 samples each.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Feed, Figure, table  # noqa: E402

BATCH = 1000


def _child(checkpoints: list[int], out: Any) -> None:
    import psutil
    from trainhealth.assembly import build_service
    from trainhealth.config import load

    proc = psutil.Process()
    with tempfile.TemporaryDirectory() as tmp:
        service, _ = build_service(load(None, {"db": os.path.join(tmp, "memory.db")}, {}))
        feed = Feed("memory", ranks=64)
        gc.collect()
        out.put(("start", 0, proc.memory_info().rss, 0.0))
        done, t0, cpu0 = 0, time.perf_counter(), time.process_time()
        for target in checkpoints:
            while done < target:
                n = min(BATCH, target - done)
                answer = service.ingest(feed.body(n), "application/json")
                if answer.status != 200:
                    raise RuntimeError(f"ingest answered {answer.status}: {answer.body}")
                done += n
            gc.collect()
            out.put(("at", done, proc.memory_info().rss, time.process_time() - cpu0))
        out.put(("alerts", service.stats.alerts_raised, 0, time.perf_counter() - t0))
        service.close()


def _per_rank_child(ranks: int, samples: int, out: Any) -> None:
    import psutil
    from trainhealth.config import load
    from trainhealth.service import Service

    proc = psutil.Process()
    service = Service(load(None, {}, {}))
    feed = Feed("wide", ranks=ranks)
    body = feed.body(ranks)  # encode first: the feed's own buffers are not the sidecar's
    gc.collect()
    before = proc.memory_info().rss
    for _ in range(samples):
        service.ingest(body, "application/json")
        body = feed.body(ranks)
    gc.collect()
    out.put(proc.memory_info().rss - before)


def per_rank(ranks: int, samples: int) -> Figure:
    """RSS added per rank once each rank sent ``samples`` samples (state and detector windows)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_per_rank_child, args=(ranks, samples, q))
    p.start()
    grown = q.get(timeout=3600)
    p.join()
    return Figure("memory", f"RSS per rank ({ranks:,} ranks x {samples} samples)", grown / ranks / 1024, "KiB",
                  None, "<", {"ranks": ranks, "samples_per_rank": samples, "grown_mib": grown / 2**20})


def run(quick: bool = False, maximum: int | None = None) -> list[Figure]:
    maximum = maximum or (10**6 if quick else 10**7)
    checkpoints = [10**k for k in range(4, 8) if 10**k <= maximum]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(checkpoints, q))
    p.start()
    points: list[tuple[int, int, float]] = []
    base, alerts = 0, 0
    while True:
        kind, n, rss, cpu = q.get(timeout=3600)
        if kind == "start":
            base = rss
        elif kind == "at":
            points.append((n, rss, cpu))
            print(f"  memory: {n:>10,} records, RSS {rss / 2**20:7.1f} MiB ({cpu:.0f} s CPU)", file=sys.stderr)
        else:
            alerts = n
            break
    p.join()
    figures = [Figure("memory", f"RSS after {n:.0e} records".replace("e+0", "e"), rss / 2**20, "MiB", None, "<",
                      {"records": n, "cpu_seconds": cpu, "rss_before_records_mib": base / 2**20,
                       "alerts_raised": alerts})
               for n, rss, cpu in points]
    windows_full = [pt for pt in points if pt[0] >= 10**5]  # 10^5 records = 1,560 samples per rank
    if len(windows_full) >= 2:
        (n0, r0, _), (n1, r1, _) = windows_full[0], windows_full[-1]
        figures.append(Figure("memory", f"RSS growth {n0:.0e} -> {n1:.0e} records".replace("e+0", "e"),
                              (r1 - r0) / r0, "ratio", 0.05, "<",
                              {"from_mib": r0 / 2**20, "to_mib": r1 / 2**20}))
    figures.append(per_rank(1024, 150) if quick else per_rank(4096, 200))
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--max", type=int, help="records to feed (default 10^7, --quick 10^6)")
    args = ap.parse_args()
    print(table(run(args.quick, args.max)))


if __name__ == "__main__":
    main()
