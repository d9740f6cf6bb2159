"""The alert stream of many traces, to prove a speed-up changed no alert (issue 26: "every corpus's alert
stream is unchanged").

    python benchmarks/alert_stream.py --save before.json      # on the old tree
    python benchmarks/alert_stream.py --compare before.json   # on the new one: exit 1 and the first
                                                              # difference of each corpus that changed

Corpora: the suite's replay-equivalence corpora (healthy, stalled, silent, straggler, paused, ended, host
leak and sawtooth, GPU growth, diverging), one hour of the benchmarks' long fp16 trace, and seeded random
jobs with faults injected (NaN, loss and gradient spikes, a mis-scaled LR, GPU memory growth and an OOM, a
host leak, a stalled rank, a silent rank, a straggler, checkpoint pauses, failed and completed ends, GPU
XIDs and ECC errors). Each is replayed (``pipeline.replay``, batches of 256 and of 1) and fed the live way
(one record per call, a timer tick every second); every transition is compared field for field. So are the
refresh lines (an open alert refreshed in place: ``replay_lines`` as ``trainhealth replay`` prints them,
``live_lines`` as the server hands them to its sinks), where the saved file has them (older files do not: those
streams are listed, not compared). Last, a line says on which corpora replay and the live path give the same
lines (after the last record both tick every second; mid-file replay ticks a run when its records come, so
verdicts due between two records may differ: docs/liveness.md, "The end of a recording").
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainhealth.config import default_detector_settings  # noqa: E402
from trainhealth.pipeline import Pipeline, replay  # noqa: E402
from trainhealth.record import Record, from_obj  # noqa: E402

GiB = float(1 << 30)
UNTIL = 120.0


def stress_job(seed: int) -> list[Record]:
    """A random data-parallel job with a few faults drawn at random (``seed`` decides all)."""
    rng = random.Random(seed)
    run = f"stress-{seed}"
    ranks = rng.choice([2, 4, 8])
    steps = rng.randint(300, 900)
    t0 = 1_700_000_000.0 + seed * 100_000
    faults = set(rng.sample(["nan", "loss_spike", "grad_spike", "lr", "gpu_growth", "oom", "host_leak", "stall",
                             "silent", "straggler", "pause", "end_failed", "end_ok", "xid", "ecc", "fp16",
                             "slow_steps", "warmup"], rng.randint(1, 4)))
    bad = rng.randrange(ranks)
    at = rng.randint(steps // 3, 2 * steps // 3)
    out: list[dict[str, Any]] = []
    lr = 0.1 * ranks * 4 if "lr" in faults else 0.1
    for r in range(ranks):
        start: dict[str, Any] = {"type": "start", "run": run, "rank": r, "time": t0 + 0.01 * r, "world_size": ranks,
                                 "batch_size": 32, "lr": lr, "reference_lr": 0.1, "reference_batch_size": 32 * ranks,
                                 "host": f"node-{r // 4}", "pid": 100 + r}
        if "warmup" in faults:
            start["warmup_steps"] = 100
        out.append(start)
    t = t0 + 5.0
    scale = 65536.0
    last = {r: steps for r in range(ranks)}
    if "stall" in faults:
        last[bad] = at
    silent = t0 + 5.0 + at * 0.5 if "silent" in faults else math.inf
    done: dict[int, float] = {0: t}
    for k in range(1, steps + 1):
        t += 0.5 + (rng.random() * 0.05) + (30.0 if "pause" in faults and k % 200 == 0 else 0.0) \
            + (2.0 if "slow_steps" in faults and k % 50 == 0 else 0.0)
        done[k] = t
        if "fp16" in faults and rng.random() < 0.01:
            scale /= 2.0
        for r in range(ranks):
            if k > last[r]:
                continue
            when = t + 0.001 * r + (0.3 if "straggler" in faults and r == bad and k > at else 0.0)
            loss = 3.0 * 0.999 ** k + rng.random() * 0.05
            grad = 1.0 + rng.random() * 0.2
            if "nan" in faults and r == bad and k >= at:
                loss = math.nan
            if "loss_spike" in faults and at <= k < at + 3:
                loss *= 40.0
            if "grad_spike" in faults and at <= k < at + 5:
                grad *= 500.0
            gpu = 30 * GiB + rng.random() * 1e8
            if "gpu_growth" in faults and r == bad:
                gpu += k * 0.08 * GiB
            host = 6 * GiB + rng.random() * 5e7
            if "host_leak" in faults and r == bad:
                host += k * 0.05 * GiB
            rec: dict[str, Any] = {
                "run": run, "rank": r, "time": when, "step": k, "phase": "step", "phase_time": when - 0.4,
                "loss": loss, "lr": lr, "grad_norm": grad, "grad_scale": scale if "fp16" in faults else None,
                "gpu_mem_allocated_bytes": min(gpu, 80 * GiB), "gpu_mem_reserved_bytes": min(gpu + 2 * GiB, 80 * GiB),
                "gpu_mem_peak_bytes": min(gpu + 1e8, 80 * GiB), "gpu_mem_total_bytes": 80 * GiB,
                "host_mem_bytes": host, "host_mem_available_bytes": max(0.0, 200 * GiB - ranks * host),
                "host_mem_total_bytes": 256 * GiB, "step_time_seconds": done[k] - done[k - 1],
                "data_time_seconds": 0.4 if "straggler" in faults and r == bad and k > at else 0.01,
                "batch_size": 32, "world_size": ranks}
            out.append(rec)
            if "oom" in faults and r == bad and k == at + 10:
                out.append({"type": "oom", "run": run, "rank": r, "time": when + 0.01, "step": k,
                            "message": "CUDA out of memory. Tried to allocate 2.00 GiB",
                            "gpu_mem_allocated_bytes": 79 * GiB, "gpu_mem_total_bytes": 80 * GiB,
                            "detail": "|===| PyTorch CUDA memory summary |===|"})
        if k % 10 == 0:
            for r in range(ranks):
                hb: dict[str, Any] = {"type": "heartbeat", "run": run, "rank": r, "time": t + 0.2 + 0.01 * r,
                                      "step": min(k, last[r]), "phase": "step", "phase_time": t}
                health: dict[str, Any] = {"index": r, "sm_clock_mhz": 1980, "sm_clock_max_mhz": 1980,
                                          "ecc_uncorrected": 0, "ecc_corrected": 0}
                if r == bad and k >= at:
                    if "xid" in faults:
                        health["xids"] = [{"xid": 79, "time": done[at]}]
                    if "ecc" in faults:
                        health["ecc_uncorrected"] = 2
                hb["gpu_health"] = health
                out.append(hb)
    for r in range(ranks):  # heartbeats of a stalled rank go on for a while
        if last[r] < steps:
            tt = done[last[r]] + 5.0
            while tt < t:
                out.append({"type": "heartbeat", "run": run, "rank": r, "time": tt, "step": last[r]})
                tt += 5.0
    if "end_failed" in faults or "end_ok" in faults:
        for r in range(ranks):
            end: dict[str, Any] = {"type": "end", "run": run, "rank": r, "time": t + 1.0, "step": last[r],
                                   "status": "completed"}
            if "end_failed" in faults and r == bad:
                end.update(status="failed", error={"type": "RuntimeError", "message": "boom",
                                                   "traceback": "Traceback (most recent call last):\n  boom"})
            out.append(end)
    out = [o for o in out if not (o["rank"] == bad and o["time"] >= silent)]
    out.sort(key=lambda o: o["time"])
    return [from_obj(o) for o in out]


def corpora(quick: bool = False) -> dict[str, list[Record]]:
    from benchmarks.where_time_goes import long_trace
    from tests.unit.test_replay_equivalence import corpora as suite_corpora

    out = suite_corpora()  # the suite's replay-equivalence corpora
    out["long8-1h"] = [from_obj(json.loads(line)) for line in long_trace(hours=0.25 if quick else 1.0)]
    for seed in range(12 if quick else 40):
        out[f"stress-{seed}"] = stress_job(seed)
    return {name: sorted(recs, key=lambda r: r.time) for name, recs in out.items()}


def streams(records: list[Record]) -> dict[str, list[dict[str, Any]]]:
    from tests import live_traces as lt

    def replayed(max_batch: int) -> list[dict[str, Any]]:
        return [dict(a) for a in replay(records, Pipeline(default_detector_settings()), max_batch=max_batch,
                                        until=UNTIL)]
    return {"replay": replayed(256), "one_at_a_time": replayed(1),
            "live": [dict(a) for a in lt.feed(records, until=records[-1].time + UNTIL)],
            "replay_lines": [dict(a) for a in replay(records, Pipeline(default_detector_settings()), until=UNTIL,
                                                     refreshes=True)],
            "live_lines": [dict(a) for a in lt.feed(records, until=records[-1].time + UNTIL, refreshes=True)]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--save", help="write every corpus's streams here (JSON)")
    ap.add_argument("--compare", help="compare with a file --save wrote; exit 1 on any difference")
    ap.add_argument("--quick", action="store_true", help="fewer random jobs, a shorter long trace")
    ap.add_argument("--only", nargs="*", help="corpus names")
    args = ap.parse_args(argv)
    got: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for name, records in corpora(args.quick).items():
        if args.only and name not in args.only:
            continue
        got[name] = streams(records)
        kinds = sorted({(a["alert"], a["state"]) for a in got[name]["replay"]})
        print(f"{name}: {len(records)} records, {len(got[name]['replay'])} transitions {kinds}", flush=True)
    # json round trip: NaN and tuples as the file holds them
    got = json.loads(json.dumps(got, default=str))
    if args.save:
        Path(args.save).write_text(json.dumps(got))
    alike = [name for name, s in got.items() if s["replay_lines"] == s["live_lines"]]
    print(f"replay and live give the same lines on {len(alike)} of {len(got)} corpora; not on: "
          f"{', '.join(sorted(set(got) - set(alike))) or 'none'}")
    if not args.compare:
        return 0
    want = json.loads(Path(args.compare).read_text())
    bad = 0
    new_streams: set[str] = set()
    for name in sorted(set(want) | set(got)):
        if name not in got or name not in want:
            print(f"{name}: only in {'the saved file' if name in want else 'this tree'}")
            continue
        for path in sorted(set(want[name]) | set(got[name])):
            if path not in want[name]:
                new_streams.add(path)
                continue
            a, b = want[name].get(path, []), got[name].get(path, [])
            if a == b:
                continue
            bad += 1
            i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            print(f"DIFFERS {name} ({path}): {len(a)} -> {len(b)} transitions; first at #{i}")
            print("  was:", json.dumps(a[i] if i < len(a) else None)[:2000])
            print("  now:", json.dumps(b[i] if i < len(b) else None)[:2000])
    if new_streams:
        print(f"not in the saved file, not compared: {', '.join(sorted(new_streams))} (--save a new one)")
    print("identical" if not bad else f"{bad} streams differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
