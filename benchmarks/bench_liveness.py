"""Cost of the rank_stalled and straggler detectors: per record (update) and per tick.

    python benchmarks/bench_liveness.py

Prints microseconds per record for each detector alone, for the whole
pipeline with and without them, and the cost of one tick for 8 to 4096 ranks.
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainhealth.config import default_detector_settings  # noqa: E402
from trainhealth.detectors import ALL  # noqa: E402
from trainhealth.detectors.liveness import RankStalled  # noqa: E402
from trainhealth.detectors.straggler import Straggler  # noqa: E402
from trainhealth.pipeline import Pipeline  # noqa: E402
from trainhealth.record import Record  # noqa: E402
from trainhealth.state import RunState  # noqa: E402


def records(ranks: int, steps: int) -> list[Record]:
    rng = random.Random(0)
    out = []
    t = 1_000_000.0
    for step in range(1, steps + 1):
        t += 0.5
        for r in range(ranks):
            out.append(Record(run="bench", rank=r, time=t + 0.001 * r, step=step, loss=2.0, lr=0.1,
                              grad_norm=1.0, step_time_seconds=0.5,
                              data_time_seconds=rng.uniform(0.01, 0.03)))
            if step % 10 == 0:
                out.append(Record(run="bench", rank=r, time=t + 0.002, step=step, type="heartbeat"))
    return out


def best_of(fn, repeat: int = 5) -> float:
    return min(fn() for _ in range(repeat))


def per_record_update(cls, recs: list[Record]) -> float:
    def once() -> float:
        det = cls(cls.Settings(), RunState(run="bench"))
        start = time.perf_counter()
        for rec in recs:
            det.update(rec)
        return (time.perf_counter() - start) / len(recs) * 1e6
    return best_of(once)


def per_record_pipeline(recs: list[Record], detectors) -> float:
    def once() -> float:
        p = Pipeline(default_detector_settings(), detectors=detectors)
        start = time.perf_counter()
        for i in range(0, len(recs), 64):
            p.process(recs[i:i + 64])
        return (time.perf_counter() - start) / len(recs) * 1e6
    return best_of(once, 3)


def tick_cost(cls, ranks: int) -> float:
    """Mean of 20 ticks, each after one more step's sample of every rank (a tick with no record since the
    previous one returns at once: it would not measure a judgement). A mean, not a median: straggler judges
    fully only every few samples per rank and returns at once in between."""
    det = cls(cls.Settings(), RunState(run="bench"))
    steps: dict[int, list[Record]] = {}
    for rec in records(ranks, 50):
        steps.setdefault(rec.step or 0, []).append(rec)
    for k in range(1, 31):
        for rec in steps[k]:
            det.update(rec)
    times = []
    for k in range(31, 51):
        step = steps[k]
        for rec in step:
            det.update(rec)
        start = time.perf_counter()
        det.tick(step[-1].time)
        times.append(time.perf_counter() - start)
    return statistics.mean(times) * 1e6


def main() -> None:
    recs = records(8, 2000)
    print(f"records: {len(recs)} (8 ranks, samples + a heartbeat every 10 steps)")
    for cls in (RankStalled, Straggler):
        print(f"{cls.name:14s} update: {per_record_update(cls, recs):6.2f} us/record")
    others = [d for d in ALL if d not in (RankStalled, Straggler)]
    with_ = per_record_pipeline(recs, ALL)
    without = per_record_pipeline(recs, others)
    print(f"pipeline (batches of 64, ticks included): {with_:.2f} us/record with both, "
          f"{without:.2f} without; difference {with_ - without:.2f} us/record")
    for ranks in (8, 64, 512, 4096):
        print(f"tick after a step of samples (mean of 20), {ranks:5d} ranks: "
              f"rank_stalled {tick_cost(RankStalled, ranks):9.1f} us, straggler {tick_cost(Straggler, ranks):9.1f} us")


if __name__ == "__main__":
    main()
