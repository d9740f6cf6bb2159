"""Cost and detection delay of the memory detectors (gpu_oom_risk, gpu_oom, host_memory_leak).

    python benchmarks/detectors_memory.py [--ranks 64] [--seeds 20] [--repeat 3]

1. Per-record cost through the real Pipeline: a healthy run (every record carries the GPU
   and host memory fields), median time per record with no detectors (the pipeline's own
   overhead) and with each memory detector; the detector's cost is the difference. Also the
   host detector while a leak alert is open (it re-judges every closed bucket).
2. Cost of one judgement (host: at each closed 60 s bucket; GPU: at each closed bucket).
3. Detection delay per leak shape, over ``--seeds`` seeded traces: median [min-max] of the
   record time (host) or step (GPU) of the first alert, and of the rate error.
4. Memory per rank of the host detector's state after 4 hours and after 7 days.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainhealth.config import default_detector_settings  # noqa: E402
from trainhealth.detectors.gpu_memory import GpuOom, GpuOomRisk  # noqa: E402
from trainhealth.detectors.host_memory import HostMemoryLeak  # noqa: E402
from trainhealth.pipeline import Pipeline, replay  # noqa: E402
from trainhealth.record import from_obj  # noqa: E402

from tests.memory_traces import (  # noqa: E402
    MB,
    T0,
    GiB,
    MiB,
    const,
    gpu_trace,
    host_trace,
    linear,
    noise,
    sawtooth,
    staircase,
    total,
    warmup,
)

G = 1e9
T = 80 * GiB


def mixed_records(ranks: int, steps: int) -> list:
    """Every rank, every step (0.5 s): GPU peak/total and host memory/available, all healthy."""
    import random

    rng = random.Random(0)
    out = [from_obj({"type": "start", "run": "bench", "rank": r, "time": T0, "host": "node-a"})
           for r in range(ranks)]
    for step in range(1, steps + 1):
        for r in range(ranks):
            out.append(from_obj({
                "run": "bench", "rank": r, "time": T0 + step * 0.5, "step": step,
                "gpu_mem_peak_bytes": 0.9 * T + rng.gauss(0, 0.002 * T), "gpu_mem_total_bytes": T,
                "gpu_mem_reserved_bytes": 0.92 * T, "host_mem_bytes": 5 * G + rng.gauss(0, 30 * MB),
                "host_mem_available_bytes": 40 * G + rng.gauss(0, 30 * MB)}))
    return out


def per_record_us(detectors: list, recs: list, repeat: int, batch: int = 1000) -> tuple[float, int]:
    times, n_alerts = [], 0
    for _ in range(repeat):
        pipeline = Pipeline(default_detector_settings(), detectors=detectors)
        t0 = time.perf_counter()
        for i in range(0, len(recs), batch):
            n_alerts += len(pipeline.process(recs[i:i + batch]).alerts)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / len(recs) * 1e6, n_alerts // repeat


def costs(ranks: int, repeat: int) -> None:
    recs = mixed_records(ranks, 1800)  # 15 minutes of a 64-rank run
    print(f"\n1. per-record cost: {len(recs)} records ({ranks} ranks x 1800 steps of 0.5 s, every "
          f"record with GPU and host memory), batches of 1000, median of {repeat}")
    base, _ = per_record_us([], recs, repeat)
    print(f"   {'pipeline, no detectors':34s} {base:6.2f} us/record")
    for name, dets in [("gpu_oom_risk", [GpuOomRisk]), ("gpu_oom", [GpuOom]),
                       ("host_memory_leak", [HostMemoryLeak]),
                       ("all three", [GpuOomRisk, GpuOom, HostMemoryLeak])]:
        us, n = per_record_us(dets, recs, repeat)
        print(f"   {name:34s} {us:6.2f} us/record  (detector: {us - base:5.2f} us; {n} alerts)")
    # host detector with every rank leaking and its alert open: judged at every closed bucket
    leaking = host_trace({r: total(const(3 * G), linear(3 * G), noise(30 * MB)) for r in range(16)},
                         4, every=1.0, seed=1)
    base, _ = per_record_us([], leaking, 1)
    us, n = per_record_us([HostMemoryLeak], leaking, 1)
    print(f"   {'host_memory_leak, 16 ranks leaking':34s} {us:6.2f} us/record  (detector: {us - base:5.2f} us; "
          f"{n} alerts; samples every 1 s for 4 h)")
    # 16 ranks under one cgroup limit, each sample with the kernel's usage: the group series and its checks
    limited = host_trace({r: total(const(1 * G), noise(30 * MB)) for r in range(16)}, 1, every=1.0, seed=2,
                         limit=64 * G, cgroup_other=0.0)
    base, _ = per_record_us([], limited, repeat)
    us, n = per_record_us([HostMemoryLeak], limited, repeat)
    print(f"   {'host_memory_leak, 16 ranks, 1 cgroup':34s} {us:6.2f} us/record  (detector: {us - base:5.2f} us; "
          f"{n} alerts; samples every 1 s for 1 h, healthy)")


def judge_cost() -> None:
    from trainhealth.detectors.host_memory import HostMemoryLeakSettings, Series

    print("\n2. one judgement (at a closed bucket)")
    s = HostMemoryLeakSettings()
    for name, shape in [("healthy", total(const(3 * G), noise(30 * MB))),
                        ("leaking 2 GB/h", total(const(3 * G), linear(2 * G), noise(30 * MB)))]:
        recs = [r for r in host_trace({0: shape}, 5, every=60.0, seed=2) if r.type == "sample"]
        series = Series(s, recs[0].time)
        for r in recs:
            series.add(r.time, r.host_mem_bytes, s)
        n = 200
        t0 = time.perf_counter()
        for _ in range(n):
            series.steady(s, recs[-1].time)
        print(f"   host, full ring ({len(series.buckets.ring)} buckets), {name:16s} "
              f"{(time.perf_counter() - t0) / n * 1e6:7.0f} us")
    det = GpuOomRisk(GpuOomRisk.Settings(), None)
    from trainhealth.detectors.gpu_memory import _Gpu

    for name, shape in [("healthy", total(const(0.9 * T), noise(0.002 * T))),
                        ("leaking 8 MiB/step", total(const(0.5 * T), linear(8 * MiB * 3600)))]:
        gpu = _Gpu(48, 1, T0)
        recs = [r for r in gpu_trace({0: shape}, 2000, seed=3) if r.type == "sample"]
        for r in recs:
            gpu.add(r.step, r.time, r.gpu_mem_peak_bytes, det.settings)
        n = 500
        t0 = time.perf_counter()
        for _ in range(n):
            gpu.open = False
            det._judge(recs[-1], gpu, T, det.settings)
        print(f"   gpu, full ring (48 buckets), {name:22s} {(time.perf_counter() - t0) / n * 1e6:7.0f} us")


def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    if not values:
        return "never"
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def first_alerts(recs: list, detectors: list) -> list:
    return list(replay(recs, Pipeline(default_detector_settings(), detectors=detectors)))


def delays(seeds: int) -> None:
    print(f"\n3. detection delay per leak shape, {seeds} seeds: median [min-max]")
    print("   host (samples every 10 s; minutes of record time after the process started)")
    base = lambda sd=30 * MB: total(const(3 * G), warmup(2 * G, 180), noise(sd))  # noqa: E731
    host_shapes = [
        ("linear 2 GB/h", lambda: total(base(), linear(2 * G)), 2000, 3),
        ("linear 500 MB/h", lambda: total(base(), linear(500 * MB)), 500, 4),
        ("slow 200 MB/h, noise sd 100 MB", lambda: total(base(100 * MB), linear(200 * MB)), 200, 4),
        ("staircase +300 MB / 20-min epoch", lambda: total(base(), staircase(300 * MB, 1200)), 900, 4),
        ("500 MB/h under a 15-min 800 MB sawtooth",
         lambda: total(base(), sawtooth(800 * MB, 900), linear(500 * MB)), 500, 4),
    ]
    for name, make, true_rate, hours in host_shapes:
        when, err, missed = [], [], 0
        for seed in range(seeds):
            out = [a for a in first_alerts(host_trace({0: make()}, hours, seed=seed), [HostMemoryLeak])
                   if a["state"] == "firing"]
            if not out:
                missed += 1
                continue
            when.append((out[0]["time"] - T0) / 60)
            err.append(100 * (out[0]["rate_mb_per_hour"] / true_rate - 1))
        print(f"   {name:42s} fires at {spread(when)} min, rate error {spread(err, '{:+.0f}')} %"
              + (f", missed {missed}" if missed else ""))
    when = []
    for seed in range(seeds):
        out = first_alerts(host_trace({0: total(base(), linear(1 * G, stop=3 * 3600))}, 6, seed=seed),
                           [HostMemoryLeak])
        when += [(a["time"] - T0) / 60 - 180 for a in out if a["state"] == "resolved"]
    print(f"   {'1 GB/h leak that stops at 3 h: resolves':42s} {spread(when)} min after it stopped")
    when = []
    for seed in range(seeds):
        fall = total(const(16 * G), linear(-3 * G), noise(50 * MB))
        out = first_alerts(host_trace({0: base()}, 3, available=fall, seed=seed), [HostMemoryLeak])
        when += [(a["time"] - T0) / 60 for a in out if a["state"] == "firing"][:1]
    print(f"   {'machine: available 16 GB falling 3 GB/h':42s} fires at {spread(when)} min")

    print("   host, fast (leaks that exhaust the machine within minutes; seconds after the leak began)")
    for name, machine, minutes_left, every in [("5 min left, 24 GB machine, samples every 1 s", 24 * G, 5, 1.0),
                                               ("5 min left, 24 GB machine, samples every 10 s", 24 * G, 5, 10.0),
                                               ("5 min left, 16 GiB machine, samples every 5 s", 16 * GiB, 5, 5.0),
                                               ("20 min left, 64 GB machine, samples every 5 s", 64 * G, 20, 5.0)]:
        when, left = [], []
        for seed in range(seeds):
            avail = machine - 0.15 * machine - 3 * G
            shape = total(const(3 * G), linear(avail / (minutes_left * 60) * 3600), noise(50 * MB))
            recs = host_trace({0: shape}, minutes_left / 60, every=every, machine_bytes=machine,
                              other_bytes=0.15 * machine, seed=seed)
            out = [a for a in first_alerts(recs, [HostMemoryLeak]) if a["state"] == "firing"]
            if out:
                when.append(out[0]["time"] - T0)
                left.append(out[0]["seconds_to_exhaustion"])
        print(f"   {name:48s} fires at {spread(when)} s, critical, forecast {spread(left)} s left")
    print("   gpu (80 GiB device, 0.5 s/step, one sample per step; step of the first alert)")
    healthy = lambda: total(const(0.5 * T), warmup(0.2 * T, 25), noise(0.002 * T))  # noqa: E731
    gpu_shapes = [
        ("leak 8 MiB/step from 70%", lambda: total(healthy(), linear(8 * MiB * 3600)), 8, {}),
        ("leak 0.5 MiB/step at 95% (near capacity)",
         lambda: total(const(0.9 * T), warmup(0.05 * T, 25), linear(0.5 * MiB * 3600, start=500),
                       noise(0.001 * T)), 0.5, {}),
        ("leak 1 MiB/step, 0.05 s/step (seconds horizon)", lambda: total(healthy(), linear(1 * MiB * 3600)),
         1, {"seconds_per_step": 0.05}),
    ]
    for name, make, true_rate, kw in gpu_shapes:
        when, err = [], []
        for seed in range(seeds):
            out = first_alerts(gpu_trace({0: make()}, 6000, seed=seed, **kw), [GpuOomRisk])
            if out:
                when.append(out[0]["step"])
                err.append(100 * (out[0]["rate_mib_per_step"] / true_rate - 1))
        print(f"   {name:48s} fires at step {spread(when)}, rate error {spread(err, '{:+.0f}')} %")


def incident_cases(seeds: int) -> None:
    """The cases measured on real processes and held-out traces (issue 20): delay, pages, forecast error."""
    print(f"\n5. one incident per leak, {seeds} seeds: median [min-max]; pages = firing transitions")

    def run(recs: list) -> list:
        pipe = Pipeline(default_detector_settings(), detectors=[HostMemoryLeak])
        out = []
        for i in range(0, len(recs), 4):
            out += [dict(a) for a in pipe.process(recs[i:i + 4]).alerts]
        return [a for a in out if a["state"] == "firing"]

    def report(name: str, delays: list, pages: list, errors: list, unit: str = "s") -> None:
        err = f", forecast error {spread(errors, '{:+.0f}')} %" if errors else ""
        print(f"   {name:58s} {spread(delays, '{:.1f}')} {unit}, pages {spread(pages)}{err}")

    d, n, e = [], [], []
    for seed in range(seeds):  # 2 ranks, each +30 MB/s from t=10 s, one 2 GiB cgroup, the kernel's usage sent
        ranks = {k: total(const(0.15 * G), linear(30 * MB * 3600, start=10), noise(5 * MB)) for k in (0, 1)}
        pages = run(host_trace(ranks, 60 / 3600, every=1.0, machine_bytes=64 * G, limit=2 * GiB, seed=seed,
                               cgroup_other=0.05 * G))
        kill = 10 + (2 * GiB - 0.35 * G) / (60 * MB)
        if pages:
            t = pages[0]["time"] - T0
            d.append(t - 10)
            n.append(len(pages))
            e.append(100 * (pages[0]["seconds_to_exhaustion"] / (kill - t) - 1))
    report("2 ranks x 30 MB/s into one 2 GiB cgroup (after the start)", d, n, e)
    for every in (1.0, 5.0):
        d, n, e = [], [], []
        for seed in range(seeds):  # 60 MB/s from t=30 s, 25 GB machine: ~6 min left
            ranks = {0: total(const(2 * G), linear(60 * MB * 3600, start=30), noise(20 * MB))}
            pages = run(host_trace(ranks, 150 / 3600, every=every, machine_bytes=25 * G, other_bytes=1.4 * G,
                                   seed=seed))
            if pages:
                t = pages[0]["time"] - T0
                d.append(t - 30)
                n.append(len(pages))
                truth = (25 * G - 1.4 * G - 2 * G - 60 * MB * (t - 30)) / (60 * MB)
                e.append(100 * (pages[0]["seconds_to_exhaustion"] / truth - 1))
        report(f"60 MB/s, 25 GB machine, 6 min left, samples every {every:.0f} s", d, n, e)
    n = []
    for seed in range(seeds):  # healthy: 4 -> 20 GiB, tau 8 min, then flat, 25 GB machine
        n.append(len(run(host_trace({0: total(const(4 * GiB), warmup(16 * GiB, 480), noise(30 * MB))}, 1.0,
                                    every=5.0, machine_bytes=25 * G, other_bytes=1 * G, seed=seed))))
    print(f"   {'healthy fill 4 -> 20 GiB (tau 8 min), 25 GB machine, 1 h':58s} pages {spread(n)}")
    d, n, e = [], [], []
    for seed in range(seeds):  # 8 ranks, 4.8 GB/h each under a 2 GB 20-min sawtooth, 512 GiB machine, ~6 h
        leak = 4.8 * G
        ranks = {k: total(const(6 * G), linear(leak), sawtooth(2 * G, 1200), noise(50 * MB)) for k in range(8)}
        pages = run(host_trace(ranks, 1.5, machine_bytes=512 * GiB, other_bytes=512 * GiB - 48 * G - 48 * leak,
                               seed=seed))
        if pages:
            d.append((pages[0]["time"] - T0) / 60)
            n.append(len(pages))
            truth = pages[0]["host_mem_available_bytes"] / (8 * leak / 3600)
            e.append(100 * (pages[0]["seconds_to_exhaustion"] / truth - 1))
    report("8 ranks, 0.8 GB per 10 min each under a 2 GB epoch sawtooth", d, n, e, unit="min")


def state_size(ranks: int) -> None:
    print(f"\n4. host_memory_leak state per rank ({ranks} ranks, one sample a minute)")
    for label, hours in [("after 4 hours", 4), ("after 7 days", 7 * 24)]:
        recs = host_trace({r: total(const(3 * G), noise(30 * MB)) for r in range(ranks)}, hours, every=60.0,
                          seed=4)
        p = Pipeline(default_detector_settings(), detectors=[HostMemoryLeak])
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        for i in range(0, len(recs), 1000):
            p.process(recs[i:i + 1000])
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        det = p.detectors["host-run"][0]
        grown = sum(s.size_diff for s in after.compare_to(before, "filename")
                    if "detectors" in (s.traceback[0].filename if s.traceback else ""))
        ring = det.ranks[0].buckets.ring
        print(f"   {label:14s} {grown / (ranks + 1) / 1024:5.1f} KiB per series (rank or machine), "
              f"ring {ring.count}/{ring.size} buckets")
        del recs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    costs(args.ranks, args.repeat)
    judge_cost()
    delays(args.seeds)
    incident_cases(min(args.seeds, 5))
    state_size(8)


if __name__ == "__main__":
    main()
