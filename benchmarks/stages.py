"""Where a record's CPU time goes: body decoding, the pipeline's own work, and each detector.

    python benchmarks/stages.py [--quick]

In-process, CPU time (process_time), best of a few interleaved passes over a healthy 64-rank run in bodies
of 1000 records: decoding (msgspec + the record checks), the pipeline with no detectors (ordering,
run/rank state, alert book), then each detector alone on top of that (its marginal cost, ticks
included), and all of them together. This is the breakdown behind the ingest and replay figures.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Feed, Figure, table  # noqa: E402


def run(quick: bool = False) -> list[Figure]:
    from trainhealth.config import default_detector_settings
    from trainhealth.detectors import ALL
    from trainhealth.ingest import Decoder
    from trainhealth.pipeline import Pipeline

    batches, passes = (32, 3) if quick else (64, 5)
    feed = Feed("stages")
    bodies = [feed.body(1000) for _ in range(batches)]
    decoder = Decoder()  # as the Service holds one: the run-name cache lives across bodies
    decoded = [decoder.decode_body(b, "application/json").records for b in bodies]
    n = batches * 1000

    def pipeline(detectors: list) -> None:
        p = Pipeline(default_detector_settings(), detectors=detectors)
        for recs in decoded:
            p.process(recs)

    runs: dict[str, Callable[[], Any]] = {"decode": lambda: [decoder.decode_body(b, "application/json")
                                                                for b in bodies],
                                          "base": lambda: pipeline([])}
    for det in ALL:
        runs[det.name] = lambda det=det: pipeline([det])
    runs["all"] = lambda: pipeline(list(ALL))
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(passes):  # interleaved, best of: a burst of other load spoils one pass, not a figure
        for name, fn in runs.items():
            t0 = time.process_time()
            fn()
            best[name] = min(best[name], (time.process_time() - t0) / n * 1e6)
    base, total = best["base"], best["all"]
    figures = [Figure("stages", "decode body (msgspec + checks)", best["decode"], "us/record"),
               Figure("stages", "pipeline, no detectors (order, state, alerts)", base, "us/record")]
    for det in ALL:
        figures.append(Figure("stages", f"  + {det.name}", best[det.name] - base, "us/record"))
    figures.append(Figure("stages", f"pipeline, all {len(ALL)} detectors", total, "us/record"))
    figures.append(Figure("stages", "decode + pipeline = records per CPU-second", 1e6 / (best["decode"] + total),
                          "records/s"))
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    print(table(run(args.quick)))


if __name__ == "__main__":
    main()
