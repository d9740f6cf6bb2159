"""All benchmarks, one command: prints a table of figures against their goals, writes JSON.

    python benchmarks/run_all.py [--quick] [--only ingest latency ...] [--profile] [--pin]
    python -m benchmarks ...            (the same)

Sections (each is also a script of its own in benchmarks/):
  stages      CPU per record: decoding, the pipeline, each detector           (stages.py)
  where       the same per stage and detector on the 64-rank feed and a long 8-rank trace, cProfile tables
              (--profile: py-spy flame graphs) in benchmarks/results/        (where_time_goes.py)
  ingest      records/s over HTTP for batches of 1/100/1000 vs in-process (journal, store and
              recorder on); replay of two traces vs the msgspec parse floor      (ingest.py)
  latency     NaN POST -> /v1/alerts and -> webhook, p50/p99, under load      (latency.py)
  exposition  GET /metrics with 1,000 ranks                                    (metrics_exposition.py)
  client      Telemetry.record() per training step                             (client_cost.py)
  client_alerts  NaN record() -> alert / heard by every rank; NaN -> stop steps  (client_alerts.py)
  memory      sidecar RSS after 10^4 .. 10^7 records (10^6 with --quick)       (memory.py)
  page        the live page's cost to ingest: history ring, a page refreshing  (page_cost.py)

Full run: about 5-8 minutes on 2 cores, most of it the 10^7-record memory run; --quick: ~1-2 minutes.
Results: benchmarks/results/run_all.json (and <section>.json); --profile adds py-spy profiles of
the sidecar under ingest load (speedscope JSON, open at https://www.speedscope.app).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Figure, machine, table, write_results  # noqa: E402

SECTIONS = ("stages", "where", "ingest", "latency", "exposition", "client", "client_alerts", "memory", "page")


def section(name: str, args: argparse.Namespace) -> Callable[[], list[Figure]]:
    quick = args.quick
    if name == "stages":
        from benchmarks import stages
        return lambda: stages.run(quick)
    if name == "where":
        from benchmarks import where_time_goes
        return lambda: where_time_goes.run(quick, args.profile)
    if name == "ingest":
        from benchmarks import ingest
        return lambda: ingest.run(quick, args.profile, args.pin)
    if name == "latency":
        from benchmarks import latency
        return lambda: latency.run(quick)
    if name == "exposition":
        from benchmarks import metrics_exposition
        return lambda: metrics_exposition.run(quick)
    if name == "page":
        from benchmarks import page_cost
        return lambda: page_cost.run(quick)
    if name == "client":
        from benchmarks import client_cost
        return lambda: client_cost.run(quick)
    if name == "client_alerts":
        from benchmarks import client_alerts
        return lambda: client_alerts.run(quick)
    from benchmarks import memory
    return lambda: memory.run(quick)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter runs, memory up to 10^6 records (~1-2 min)")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, metavar="SECTION", help=f"of {', '.join(SECTIONS)}")
    ap.add_argument("--profile", action="store_true", help="py-spy the sidecar during the ingest runs")
    ap.add_argument("--pin", action="store_true", help="ingest: sidecar on core 0, load generator on core 1")
    args = ap.parse_args(argv)
    info = machine()
    print(f"trainhealth benchmarks{' (quick)' if args.quick else ''}: {info}", flush=True)
    figures: list[Figure] = []
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    for name in args.only or SECTIONS:
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        got = section(name, args)()
        seconds[name] = time.perf_counter() - t0
        write_results(name, got, {"quick": args.quick, "machine": info, "seconds": seconds[name]})
        print(table(got), flush=True)
        figures += got
    total = time.perf_counter() - started
    path = write_results("run_all", figures, {"quick": args.quick, "machine": info, "seconds": total,
                                              "section_seconds": seconds})
    print(f"\n== all figures ({total:.0f} s; {path})")
    print(table(figures))
    missed = [f for f in figures if f.met is False]
    if missed:
        print(f"\n{len(missed)} goal(s) missed: " + "; ".join(f.name for f in missed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
