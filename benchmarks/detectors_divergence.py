"""Per-record cost of the divergence detectors through the real Pipeline.

    python benchmarks/detectors_divergence.py [--ranks 64] [--steps 500] [--repeat 5]

Feeds a healthy run (each rank: loss, grad_norm, lr, fp16 grad_scale with a few overflow
steps) in batches of 1000 records, and prints the median time per record of the pipeline
with no detectors (its own overhead), with each detector alone, and with all four; the
detector's cost is the difference to the empty pipeline.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainhealth.config import default_detector_settings  # noqa: E402
from trainhealth.detectors.lr_scaling import LrScaling  # noqa: E402
from trainhealth.detectors.nan_divergence import NanDivergence  # noqa: E402
from trainhealth.detectors.spikes import GradExplosion, LossSpike  # noqa: E402
from trainhealth.pipeline import Pipeline  # noqa: E402

from tests.unit.traces import healthy, merge, samples, start, with_amp  # noqa: E402


def records(ranks: int, steps: int) -> list:
    streams = []
    lr = 0.1 * ranks * 4 / 256
    for r in range(ranks):
        # the LR the start record declares (linear scaling of 0.1 at 256 to the run's total batch), warmed up
        # over the declared 100 steps: a run the lr_scaling detector must find right
        trace = with_amp(healthy(steps, seed=r, df=3, loss_noise=0.1, grad_noise=0.3, peak_lr=lr, warmup=100),
                         [0, 1, 2, steps // 2], growth_interval=steps // 3)
        streams.append(samples(trace, rank=r))
    starts = [start(r, world_size=ranks, batch_size=4, lr=lr, warmup_steps=100,
                    reference_lr=0.1, reference_batch_size=256) for r in range(ranks)]
    return starts + merge(*streams)


def per_record_us(detectors: list, recs: list, repeat: int, batch: int = 1000) -> float:
    times = []
    for _ in range(repeat):
        pipeline = Pipeline(default_detector_settings(), detectors=detectors)
        t0 = time.perf_counter()
        for i in range(0, len(recs), batch):
            out = pipeline.process(recs[i:i + batch])
            assert not out.alerts, out.alerts  # healthy: the benchmark measures the quiet path
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / len(recs) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=64)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    recs = records(args.ranks, args.steps)
    print(f"{len(recs)} records ({args.ranks} ranks x {args.steps} steps), batches of 1000, "
          f"median of {args.repeat}")
    base = per_record_us([], recs, args.repeat)
    print(f"{'pipeline, no detectors':28s} {base:6.2f} us/record")
    sets = [("lr_scaling", [LrScaling]), ("loss_spike", [LossSpike]),
            ("grad_explosion", [GradExplosion]), ("nan_divergence", [NanDivergence]),
            ("all four", [LrScaling, LossSpike, GradExplosion, NanDivergence])]
    for name, dets in sets:
        us = per_record_us(dets, recs, args.repeat)
        print(f"{name:28s} {us:6.2f} us/record  (detector: {us - base:5.2f} us)")


if __name__ == "__main__":
    main()
