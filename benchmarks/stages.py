"""Where a record's CPU time goes: body decoding, the pipeline's own work, and each detector.

    python benchmarks/stages.py [--quick]

In-process, CPU time (process_time), best of a few passes over a healthy 64-rank run in bodies
of 1000 records: decoding (msgspec + the record checks), the pipeline with no detectors (ordering,
run/rank state, alert book), then each detector alone on top of that (its marginal cost, ticks
included), and all of them together. This is the breakdown behind the ingest and replay figures.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Feed, Figure, table  # noqa: E402


def run(quick: bool = False) -> list[Figure]:
    from monitor.config import default_detector_settings
    from monitor.detectors import ALL
    from monitor.ingest import decode_body
    from monitor.pipeline import Pipeline

    batches, passes = (32, 2) if quick else (64, 3)
    feed = Feed("stages")
    bodies = [feed.body(1000) for _ in range(batches)]
    n = batches * 1000

    def cpu_us(fn) -> float:  # type: ignore[no-untyped-def]
        best = float("inf")
        for _ in range(passes):
            t0 = time.process_time()
            fn()
            best = min(best, time.process_time() - t0)
        return best / n * 1e6

    decode = cpu_us(lambda: [decode_body(b, "application/json") for b in bodies])
    decoded = [decode_body(b, "application/json").records for b in bodies]

    def pipeline(detectors: list) -> float:
        def once() -> None:
            p = Pipeline(default_detector_settings(), detectors=detectors)
            for recs in decoded:
                p.process(recs)
        return cpu_us(once)

    base = pipeline([])
    figures = [Figure("stages", "decode body (msgspec + checks)", decode, "us/record"),
               Figure("stages", "pipeline, no detectors (order, state, alerts)", base, "us/record")]
    for det in ALL:
        figures.append(Figure("stages", f"  + {det.name}", pipeline([det]) - base, "us/record"))
    total = pipeline(list(ALL))
    figures.append(Figure("stages", f"pipeline, all {len(ALL)} detectors", total, "us/record"))
    figures.append(Figure("stages", "decode + pipeline = records per CPU-second", 1e6 / (decode + total),
                          "records/s"))
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    print(table(run(args.quick)))


if __name__ == "__main__":
    main()
