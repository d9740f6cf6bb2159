"""Ingest and replay throughput.

    python benchmarks/ingest.py [--quick] [--profile]

- HTTP: the real sidecar takes POST /v1/ingest from a separate load generator process over
  16 keep-alive connections, batches of 1, 100 and 1000 records; after a warm-up, the best of
  a few measurement windows.
- In-process limit: the same Service (decode + state + all detectors + store wiring) called
  directly on the same kind of bodies in this process, best of passes run before and after the
  HTTP windows: what HTTP cannot beat.
- Replay: ``python -m trainhealth replay`` over a .jsonl file (start-up time subtracted).

"On one core" figures are records per CPU-second of the process doing the work (the sidecar's
CPU time from psutil; process_time in-process). On a machine shared with other work, wall-clock
rates fall with the share of a core the process gets; per CPU-second figures do not, so the goals
are judged on them and the wall-clock rates and core shares are reported beside them.
``--pin`` pins the sidecar to core 0 and the load generator to core 1 (best on an idle machine).

Every record comes from ``common.Feed``: a healthy 64-rank run whose steps keep advancing, so
windows fill and detectors do their real work. ``--profile`` records the sidecar with py-spy
(speedscope JSON in benchmarks/results/).
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, ROOT, Feed, Figure, Sidecar, pin, python_path, table  # noqa: E402
from benchmarks.loadgen import run_load  # noqa: E402

SIZES = (1, 100, 1000)
CONNECTIONS = 16  # one run per connection
RUNS = 16  # the in-process limit cycles over as many runs


def in_process_rate(size: int, records: int, tmp: str, name: str) -> tuple[float, float]:
    """Records per CPU-second and per wall second of Service.ingest as served: the store, the detectors'
    journal (checkpoint) and the flight recorder attached."""
    from trainhealth.assembly import build_service
    from trainhealth.config import load

    service, _ = build_service(load(None, {"db": os.path.join(tmp, f"{name}.db"),
                                           "record_dir": os.path.join(tmp, f"{name}-rec")}, {}), keep_state=True)
    feeds = [Feed(f"{name}-{k}") for k in range(RUNS)]
    bodies = [feeds[i % RUNS].body(size) for i in range(max(1, records // size))]
    gc.collect()
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    for body in bodies:
        answer = service.ingest(body, "application/json")
        n += answer.body["accepted"]
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    service.close()
    assert n == len(bodies) * size, n
    return n / cpu, n / wall


def http_rate(sidecar: Sidecar, size: int, windows: int, seconds: float, profile: bool,
              core: int | None) -> dict[str, float]:
    """Over HTTP, the best of ``windows`` measurement windows (after a warm-up): records per sidecar
    CPU-second and per wall second, and the core shares of the sidecar and of the load generator."""
    spy = None
    if profile:
        spy = sidecar.profile(RESULTS / f"profile-ingest-batch{size}.speedscope.json", windows * seconds + 0.5)
    result = run_load(sidecar.url, size, [0.5] + [seconds] * windows, CONNECTIONS, f"http{size}", core,
                      sidecar.proc.pid)
    if spy is not None:
        spy.wait()
    if result["errors"]:
        raise RuntimeError(f"{result['errors']} ingest requests failed:\n" + "".join(sidecar.lines[-10:]))
    best = max(result["windows"][1:], key=lambda w: w["requests"] / max(w["server_cpu_seconds"], 1e-9))
    records = best["requests"] * size
    return {"per_cpu_second": records / best["server_cpu_seconds"], "wall": records / best["seconds"],
            "core_share": best["server_cpu_seconds"] / best["seconds"],
            "client_core_share": best["client_cpu_seconds"] / best["seconds"]}


def replay_rate(path: str, tmp: str) -> tuple[float, float, float, int]:
    """Records per wall second and per CPU-second of ``trainhealth replay`` over ``path`` (process start-up
    subtracted from both), the start-up seconds, and the records."""
    tiny = os.path.join(tmp, "tiny.jsonl")
    with open(tiny, "wb") as fh:
        fh.write(Feed("replay").lines(1))

    def timed(file: str) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([sys.executable, "-m", "trainhealth", "replay", "--until", "60", file], cwd=ROOT,
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env={**os.environ, "PYTHONPATH": python_path()})
        c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.perf_counter() - t0, (c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime)

    startup, startup_cpu = min(timed(tiny) for _ in range(2))
    total, total_cpu = timed(path)
    with open(path, "rb") as fh:
        n = sum(1 for line in fh if line.strip())
    return n / (total - startup), n / (total_cpu - startup_cpu), startup, n


def parse_floor(path: str) -> float:
    """Records per CPU-second of merely parsing the file's lines into Records with msgspec (best of 3)."""
    import msgspec
    from trainhealth.record import Record

    with open(path, "rb") as fh:
        blob = fh.read()
    decode = msgspec.json.Decoder(Record).decode_lines
    best = float("inf")
    for _ in range(3):
        c0 = time.process_time()
        n = len(decode(blob))
        best = min(best, time.process_time() - c0)
    return n / best


def replay_figures(tmp: str, quick: bool) -> list[Figure]:
    """``trainhealth replay`` over the healthy 64-rank feed and a long 8-rank trace (heartbeats, every
    memory field: where_time_goes.long_trace), against the msgspec parse floor of the same file."""
    from benchmarks.where_time_goes import long_trace

    figures = []
    feed_path, long_path = os.path.join(tmp, "feed64.jsonl"), os.path.join(tmp, "long8.jsonl")
    feed = Feed("replay")
    with open(feed_path, "wb") as fh:
        for _ in range((100_000 if quick else 300_000) // 1000):
            fh.write(feed.lines(1000))
    with open(long_path, "wb") as fh:
        fh.write(b"\n".join(long_trace(hours=2.0 if quick else 8.0)) + b"\n")
    for name, path in (("64 ranks", feed_path), ("8 ranks, long trace", long_path)):
        rate, cpu_rate, startup, n = replay_rate(path, tmp)
        floor = parse_floor(path)
        os.unlink(path)
        figures.append(Figure("replay", f"replay, all detectors, {name} ({n:,} records)", cpu_rate, "records/s",
                              300_000.0, ">=", {"per": "CPU-second", "wall_records_s": rate,
                                                "startup_seconds": startup, "parse_floor": floor}))
        figures.append(Figure("replay", f"  vs the msgspec parse floor of the same file ({floor:,.0f}/s)",
                              cpu_rate / floor, "ratio", 0.25, ">="))
    return figures


def run(quick: bool = False, profile: bool = False, pinned: bool = False) -> list[Figure]:
    seconds, windows, passes = (1.0, 2, 2) if quick else (2.0, 3, 3)
    figures = []
    with tempfile.TemporaryDirectory() as tmp:
        # as served: the store, the detectors' journal and snapshots, the history ring, the flight recorder
        sidecar = Sidecar("--db", os.path.join(tmp, "http.db"), "--record", os.path.join(tmp, "rec"),
                          core=0 if pinned else None)
        try:
            for size in SIZES:
                # in-process passes before and after the HTTP windows; the best of each is reported
                records = 20_000 if size == 1 else 100_000
                limits = [in_process(size, records, tmp, pinned, k) for k in range(passes - 1)]
                got = http_rate(sidecar, size, windows, seconds, profile, 1 if pinned else None)
                limits.append(in_process(size, records, tmp, pinned, passes))
                limit, limit_wall = max(limits)
                rate = got["per_cpu_second"]
                figures.append(Figure(
                    "ingest", f"HTTP, batch {size}", rate, "records/s", 150_000.0 if size == 1000 else None,
                    ">=", {"batch": size, "per": "sidecar CPU-second", "wall_records_s": got["wall"],
                           "sidecar_core_share": got["core_share"], "client_core_share": got["client_core_share"],
                           "requests_per_cpu_second": rate / size, "in_process_limit": limit,
                           "vs_limit": rate / limit}))
                figures.append(Figure("ingest", f"in-process limit, batch {size}", limit, "records/s", None,
                                      ">=", {"per": "CPU-second", "wall_records_s": limit_wall}))
                if size == 1000:
                    figures.append(Figure("ingest", "HTTP / in-process, batch 1000", rate / limit, "ratio",
                                          0.7, ">="))
            # RSS after depends on where the runs end in the 30 s cycle of state snapshots: one being written
            # holds several times its size more (docs/operations.md); the peak is the one to plan for
            figures.append(Figure("ingest", "sidecar RSS after the HTTP runs", sidecar.rss() / 2**20, "MiB", None,
                                  "<", {"runs": len(SIZES) * CONNECTIONS, "ranks_per_run": 64}))
            peak = sidecar.peak_rss()
            if peak is not None:
                figures.append(Figure("ingest", "sidecar peak RSS (state snapshots included)", peak / 2**20, "MiB",
                                      None, "<", {"runs": len(SIZES) * CONNECTIONS, "ranks_per_run": 64}))
        finally:
            sidecar.stop()
        figures += replay_figures(tmp, quick)
    return figures


def in_process(size: int, records: int, tmp: str, pinned: bool, k: int) -> tuple[float, float]:
    if pinned:
        pin(0)
    try:
        return in_process_rate(size, records, tmp, f"limit{size}.{k}")
    finally:
        unpin()


def unpin() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, range(os.cpu_count() or 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--profile", action="store_true", help="py-spy the sidecar during the HTTP runs")
    ap.add_argument("--pin", action="store_true", help="sidecar on core 0, load generator on core 1")
    args = ap.parse_args()
    print(table(run(args.quick, args.profile, args.pin)))


if __name__ == "__main__":
    main()
