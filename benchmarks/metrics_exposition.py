"""Cost of GET /metrics at many ranks, and how long it holds the event loop.

    python benchmarks/metrics_exposition.py [--ranks 1000] [--runs 1] [--repeat 30]

Part 1 (in process): the snapshot (taken on the event loop) and the render
(families + text formatting, done in a worker thread by the route), per scrape:
without a cache (the first scrape: every line written), with the ranks unchanged
(their text reused from the previous scrape: RankLines), with every rank
changed since the previous scrape (its loss, step and time: those families written
again), with a tenth of the ranks changed, and with every value of every rank changed.
Part 2 (real sidecar): GET /metrics end to end, with the ranks unchanged between
scrapes and with every rank sending a record between scrapes (not timed), and
the worst /healthz latency seen while scrapes run back to back (what other
requests wait for), against /healthz with no scrape running.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainhealth.config import Settings  # noqa: E402
from trainhealth.http.metrics import state_collector  # noqa: E402
from trainhealth.metrics.collector import render  # noqa: E402
from trainhealth.service import Service  # noqa: E402

from benchmarks.common import Figure  # noqa: E402

FIELDS = {"loss": 2.31, "lr": 0.02, "grad_norm": 1.7, "grad_scale": 65536.0, "gpu_mem_peak_bytes": 6.1e10,
          "gpu_mem_total_bytes": 8.0e10, "gpu_mem_allocated_bytes": 4.2e10, "gpu_mem_reserved_bytes": 6.4e10,
          "host_mem_bytes": 1.2e10, "host_mem_available_bytes": 4.0e11, "host_mem_total_bytes": 1.0e12,
          "step_time_seconds": 0.41, "data_time_seconds": 0.03}


def records(ranks: int, runs: int, step: int = 100, every_value: bool = False) -> list[dict]:
    """One sample per rank: its loss, step and time change with ``step``; with ``every_value`` every field
    does (as in training, where memory and timings move every step too)."""
    now = time.time()
    per_run = ranks // runs
    fields = {key: float(round(value * (1 + step * 1e-5))) if key.endswith("_bytes") else value * (1 + step * 1e-5)
              for key, value in FIELDS.items()} if every_value else FIELDS  # (byte counts stay whole)
    return [{"run": f"job-{j}", "rank": r, "time": now, "step": step, **fields, "loss": 2.31 + step * 1e-4}
            for j in range(runs) for r in range(per_run)]


def ms(xs: list[float]) -> str:
    return f"median {statistics.median(xs) * 1e3:.1f} ms, max {max(xs) * 1e3:.1f} ms"


def in_process(body: bytes, repeat: int, runs: int = 1) -> dict[str, float]:
    service = Service(Settings())
    service.ingest(body, "application/json")
    collector = state_collector(service)
    snaps, renders, cached = [], [], []
    for _ in range(repeat):
        t0 = time.process_time()
        snap = collector.snapshot()
        t1 = time.process_time()
        text = render(snap)  # no cache: every rank formatted, as when each changed since the last scrape
        t2 = time.process_time()
        render(snap, collector.lines)  # fills the cache; the next render reuses every rank
        t3 = time.process_time()
        again = render(snap, collector.lines)
        t4 = time.process_time()
        assert again == text
        snaps.append(t1 - t0)
        renders.append(t2 - t1)
        cached.append(t4 - t3)
    ranks = sum(len(rows) for _, rows in collector.snapshot().runs)
    changed_snaps, changed = [], []
    for k in range(repeat):  # as served: every rank sent a record since the previous scrape (loss, step, time)
        service.ingest(json.dumps(records(ranks, runs, 101 + k)).encode(), "application/json")
        t0 = time.process_time()
        snap = collector.snapshot()
        t1 = time.process_time()
        render(snap, collector.lines)
        changed_snaps.append(t1 - t0)
        changed.append(time.process_time() - t1)
    tenth = []
    for k in range(repeat):  # a tenth of the ranks sent a record since (heartbeats, a step half reported)
        sample = records(ranks, runs, 101 + repeat + k)
        service.ingest(json.dumps(sample[k % 10::10]).encode(), "application/json")
        snap = collector.snapshot()
        t0 = time.process_time()
        render(snap, collector.lines)
        tenth.append(time.process_time() - t0)
    every = []
    for k in range(repeat):  # every value of every rank changed (the text of 16 families of 19 written again)
        service.ingest(json.dumps(records(ranks, runs, 101 + 2 * repeat + k, every_value=True)).encode(),
                       "application/json")
        snap = collector.snapshot()
        t0 = time.process_time()
        render(snap, collector.lines)
        every.append(time.process_time() - t0)
    series = sum(1 for line in text.splitlines() if line and not line.startswith(b"#"))
    print(f"in process: {series} series, {len(text) / 1e6:.2f} MB")
    print(f"  snapshot (on the event loop): {ms(snaps)}; every rank changed: {ms(changed_snaps)}")
    print(f"  render (worker thread), no cache (the first scrape): {ms(renders)}  = "
          f"{statistics.median(renders) / series * 1e6:.1f} us/series")
    print(f"  render, ranks unchanged (lines reused):     {ms(cached)}")
    print(f"  render, every rank changed since the previous scrape: {ms(changed)}")
    print(f"  render, a tenth of the ranks changed:       {ms(tenth)}")
    print(f"  render, every value of every rank changed:  {ms(every)}")
    return {"series": series, "snapshot_ms": statistics.median(snaps) * 1e3,
            "snapshot_changed_ms": statistics.median(changed_snaps) * 1e3,
            "render_ms": statistics.median(renders) * 1e3, "render_unchanged_ms": statistics.median(cached) * 1e3,
            "render_changed_ms": statistics.median(changed) * 1e3,
            "render_tenth_changed_ms": statistics.median(tenth) * 1e3,
            "render_every_value_ms": statistics.median(every) * 1e3}


def real_server(body: bytes, repeat: int, probe_seconds: float = 5.0, ranks: int = 1000,
                runs: int = 1) -> dict[str, float]:
    from tests.conftest import Sidecar

    with tempfile.TemporaryDirectory() as tmp:
        sidecar = Sidecar(["--db", f"{tmp}/bench.db"], cwd=Path(tmp))
        try:
            client = sidecar.client
            assert client.post("/v1/ingest", content=body,
                               headers={"content-type": "application/json"}).status_code == 200
            import psutil

            proc = psutil.Process(sidecar.proc.pid)

            def cpu() -> float:
                t = proc.cpu_times()
                return float(t.user + t.system)

            scrapes, scrape_cpu = [], []
            for _ in range(repeat):
                t0, c0 = time.perf_counter(), cpu()
                assert client.get("/metrics").status_code == 200
                scrapes.append(time.perf_counter() - t0)
                scrape_cpu.append(cpu() - c0)
            print(f"real sidecar: GET /metrics, ranks unchanged {ms(scrapes)}")
            changed, changed_cpu = [], []
            for k in range(repeat):  # every rank sends a record between scrapes (the post is not timed)
                fresh = json.dumps(records(ranks, runs, 101 + k)).encode()
                assert client.post("/v1/ingest", content=fresh,
                                   headers={"content-type": "application/json"}).status_code == 200
                t0, c0 = time.perf_counter(), cpu()
                assert client.get("/metrics").status_code == 200
                changed.append(time.perf_counter() - t0)
                changed_cpu.append(cpu() - c0)
            print(f"real sidecar: GET /metrics, every rank changed {ms(changed)}")
            cpu_same, cpu_changed = statistics.mean(scrape_cpu) * 1e3, statistics.mean(changed_cpu) * 1e3
            print(f"  sidecar CPU per scrape (mean; psutil counts 10 ms ticks): unchanged {cpu_same:.1f} ms, "
                  f"every rank changed {cpu_changed:.1f} ms")
            idle = probe(sidecar.url, None, probe_seconds / 2)
            stop = threading.Event()
            worker = threading.Thread(target=scrape_loop, args=(sidecar.url, stop))
            worker.start()
            busy = probe(sidecar.url, stop, probe_seconds)
            worker.join()
            print(f"  /healthz alone:                 {ms(idle)}")
            print(f"  /healthz during back-to-back scrapes: {ms(busy)} ({len(busy)} probes)")
        finally:
            sidecar.stop()
    return {"median_ms": statistics.median(scrapes) * 1e3, "max_ms": max(scrapes) * 1e3,
            "changed_median_ms": statistics.median(changed) * 1e3,
            "cpu_ms": statistics.mean(scrape_cpu) * 1e3, "changed_cpu_ms": statistics.mean(changed_cpu) * 1e3,
            "healthz_idle_median_ms": statistics.median(idle) * 1e3,
            "healthz_during_scrapes_median_ms": statistics.median(busy) * 1e3,
            "healthz_during_scrapes_max_ms": max(busy) * 1e3}


def run(quick: bool = False, ranks: int = 1000) -> list[Figure]:
    repeat = 15 if quick else 30
    body = json.dumps(records(ranks, 1)).encode()
    local = in_process(body, repeat)
    served = real_server(body, repeat, 2.0 if quick else 5.0, ranks)
    return [Figure("exposition", f"GET /metrics, {ranks:,} ranks unchanged since the last scrape (sidecar CPU)",
                   served["cpu_ms"], "ms", 10.0, "<", {"ranks": ranks, "per": "sidecar CPU per scrape, mean",
                                                      **local, **served}),
            Figure("exposition", f"GET /metrics, {ranks:,} ranks, every one changed (sidecar CPU)",
                   served["changed_cpu_ms"], "ms", 10.0, "<", {"ranks": ranks, **served}),
            Figure("exposition", f"render only, {ranks:,} ranks ({local['series']:,} series), no cache (first scrape)",
                   local["render_ms"], "ms", None, "<", local),
            Figure("exposition", "render only, every rank changed since the previous scrape",
                   local["render_changed_ms"], "ms", None, "<", local),
            Figure("exposition", "render only, a tenth of the ranks changed", local["render_tenth_changed_ms"],
                   "ms", None, "<", local),
            Figure("exposition", "render only, every value of every rank changed", local["render_every_value_ms"],
                   "ms", None, "<", local),
            Figure("exposition", "render only, ranks unchanged (lines reused)", local["render_unchanged_ms"],
                   "ms", None, "<", local)]


def scrape_loop(url: str, stop: threading.Event) -> None:
    import httpx

    with httpx.Client(base_url=url) as client:
        while not stop.is_set():
            client.get("/metrics")


def probe(url: str, stop: threading.Event | None, seconds: float) -> list[float]:
    import httpx

    out = []
    deadline = time.monotonic() + seconds
    with httpx.Client(base_url=url) as client:
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            client.get("/healthz")
            out.append(time.perf_counter() - t0)
            time.sleep(0.002)
    if stop is not None:
        stop.set()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=1000)
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--no-server", action="store_true")
    args = p.parse_args()
    body = json.dumps(records(args.ranks, args.runs)).encode()
    print(f"{args.ranks} ranks in {args.runs} run(s), {len(FIELDS)} value fields per rank")
    in_process(body, args.repeat, args.runs)
    if not args.no_server:
        real_server(body, args.repeat, ranks=args.ranks, runs=args.runs)


if __name__ == "__main__":
    main()
