"""Where each microsecond of a record goes: per pipeline stage and per detector, on two workloads.

    python benchmarks/where_time_goes.py [--quick] [--flame]

- ``feed64``: the healthy 64-rank run of ``common.Feed`` in bodies of 1000 records (the ingest path).
- ``long8``: a long healthy fp16 run of 8 ranks (``long_trace``): a sample every 2 s per rank with every
  field (GPU and host memory, grad_scale, step and data time), a heartbeat every 5 s per rank, as the
  replay of an 8-hour recording sees it (``pipeline.replay``: batches within one tick of record time).

For each: CPU time (``process_time``) per record of decoding (msgspec + checks), of the pipeline with no
detectors (ordering, run/rank state, history ring, alert book), of each detector alone on top of that (its
marginal cost, ticks included), of all of them; for feed64 also what the served ``Service.ingest`` adds
(journal, store's runs, flight recorder). Best of interleaved passes. cProfile tables of the whole
pipeline go to ``benchmarks/results/profile-<workload>.txt``; ``--flame`` also records each workload's
pipeline under py-spy (``profile-<workload>.speedscope.json``, open at https://www.speedscope.app).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, ROOT, Feed, Figure, python_path, table  # noqa: E402

GiB = float(1 << 30)


def long_trace(hours: float = 8.0, ranks: int = 8, step_seconds: float = 2.0, heartbeat: float = 5.0,
               run: str = "long8", seed: int = 8) -> list[bytes]:
    """A healthy fp16 run as .jsonl lines in time order: starts, samples with every field, heartbeats."""
    import json

    rng = random.Random(seed)
    t0 = 1_700_000_000.0
    out: list[tuple[float, bytes]] = []
    for r in range(ranks):
        out.append((t0 + 0.01 * r, json.dumps({
            "type": "start", "run": run, "rank": r, "time": t0 + 0.01 * r, "world_size": ranks, "batch_size": 32,
            "lr": 3e-4, "reference_lr": 3e-4, "reference_batch_size": 32 * ranks, "host": f"node-{r // 4}",
            "pid": 1000 + r}).encode()))
    steps = int(hours * 3600 / step_seconds)
    scale = 65536.0
    for k in range(1, steps + 1):
        if k % 2000 == 0:
            scale *= 2.0
        if rng.random() < 0.0005:  # an overflow now and then: the scaler halves, as fp16 runs do
            scale /= 2.0
        done = t0 + 10.0 + k * step_seconds
        for r in range(ranks):
            t = done + 0.001 * r
            out.append((t, json.dumps({
                "run": run, "rank": r, "time": t, "step": k, "phase": "step", "phase_time": t - 1.5,
                "loss": 2.0 * 0.9999 ** k + rng.random() * 0.05, "lr": 3e-4, "grad_norm": 1.0 + rng.random() * 0.1,
                "grad_scale": scale, "gpu_mem_allocated_bytes": 30 * GiB + rng.random() * 1e8,
                "gpu_mem_reserved_bytes": 34 * GiB, "gpu_mem_peak_bytes": 32 * GiB + rng.random() * 1e8,
                "gpu_mem_total_bytes": 80 * GiB, "host_mem_bytes": 6 * GiB + rng.random() * 5e7,
                "host_mem_available_bytes": 400 * GiB, "host_mem_total_bytes": 512 * GiB,
                "step_time_seconds": step_seconds + rng.random() * 0.02,
                "data_time_seconds": 0.05 + rng.random() * 0.01, "batch_size": 32, "world_size": ranks}).encode()))
    for r in range(ranks):
        t = t0 + heartbeat * (0.5 + 0.1 * r)
        while t < t0 + 10.0 + steps * step_seconds:
            step = max(0, int((t - t0 - 10.0) // step_seconds))
            out.append((t, json.dumps({"type": "heartbeat", "run": run, "rank": r, "time": t, "step": step,
                                       "phase": "step", "phase_time": t - 1.0}).encode()))
            t += heartbeat
    out.sort(key=lambda x: x[0])
    return [line for _, line in out]


def _best(runs: dict[str, Callable[[], Any]], passes: int, n: int) -> dict[str, float]:
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(passes):  # interleaved: a burst of other load spoils one pass, not a figure
        for name, fn in runs.items():
            t0 = time.process_time()
            spent = fn()  # a run that times itself (setting up is not its cost) returns its CPU seconds
            if not isinstance(spent, float):
                spent = time.process_time() - t0
            best[name] = min(best[name], spent / n * 1e6)
    return best


def _profile(name: str, fn: Callable[[], Any]) -> Path:
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(40)
    stats.sort_stats("cumulative").print_stats(40)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"profile-{name}.txt"
    path.write_text(out.getvalue())
    return path


def stages(workload: str, quick: bool) -> list[Figure]:
    from trainhealth.config import default_detector_settings
    from trainhealth.detectors import ALL
    from trainhealth.ingest import Decoder
    from trainhealth.pipeline import Pipeline, replay

    decoder = Decoder()
    if workload == "feed64":
        feed = Feed(workload)
        bodies = [feed.body(1000) for _ in range(24 if quick else 48)]
        batches = [decoder.decode_body(b, "application/json").records for b in bodies]
        n = sum(map(len, batches))

        def decode() -> None:
            for b in bodies:
                decoder.decode_body(b, "application/json")

        def pipeline(detectors: list[Any]) -> None:
            p = Pipeline(default_detector_settings(), detectors=detectors)
            for recs in batches:
                p.process(recs)
    else:
        lines = long_trace(hours=2.0 if quick else 8.0)
        records = [decoder.decode_record(ln) for ln in lines]
        n = len(records)

        def decode() -> None:
            dec = decoder.decode_record
            for ln in lines:
                dec(ln)

        def pipeline(detectors: list[Any]) -> None:
            for _ in replay(records, Pipeline(default_detector_settings(), detectors=detectors)):
                pass

    runs: dict[str, Callable[[], Any]] = {"decode": decode, "base": lambda: pipeline([])}
    for det in ALL:
        runs[det.name] = lambda det=det: pipeline([det])
    runs["all"] = lambda: pipeline(list(ALL))
    if workload == "feed64":
        runs["served"] = _served(bodies)
    best = _best(runs, 2 if quick else 3, n)
    _profile(workload, lambda: pipeline(list(ALL)))
    base, total = best["base"], best["all"]
    w = f"{workload} ({n:,} records)"
    figures = [Figure("where", f"{w}: decode (msgspec + checks)", best["decode"], "us/record"),
               Figure("where", f"{w}: pipeline, no detectors", base, "us/record")]
    for det in ALL:
        figures.append(Figure("where", f"{w}:   + {det.name}", best[det.name] - base, "us/record"))
    figures.append(Figure("where", f"{w}: pipeline, all {len(ALL)} detectors", total, "us/record"))
    if "served" in best:
        figures.append(Figure("where", f"{w}: Service.ingest as served (decode + pipeline + journal, "
                                       "store, recorder)", best["served"], "us/record"))
        figures.append(Figure("where", f"{w}:   of which journal + store + recorder",
                              best["served"] - best["decode"] - total, "us/record"))
    figures.append(Figure("where", f"{w}: decode + pipeline", 1e6 / (best["decode"] + total), "records/s"))
    return figures


def _served(bodies: list[bytes]) -> Callable[[], float]:
    """Service.ingest with the store, the journal (checkpoint) and the flight recorder, as served: CPU seconds
    of the ingest calls (not of building and closing the service)."""

    def run() -> float:
        from trainhealth.assembly import build_service
        from trainhealth.config import load

        with tempfile.TemporaryDirectory() as tmp:
            service, _ = build_service(load(None, {"db": os.path.join(tmp, "s.db"),
                                                   "record_dir": os.path.join(tmp, "rec")}, {}), keep_state=True)
            t0 = time.process_time()
            for body in bodies:
                service.ingest(body, "application/json")
            spent = time.process_time() - t0
            service.close()
        return spent
    return run


def flame(workload: str, quick: bool) -> Path | None:
    """py-spy over a child process that runs the workload's pipeline (all detectors) a few times."""
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if spy is None:
        print("(py-spy not installed: pip install py-spy; no flame graph)", file=sys.stderr)
        return None
    path = RESULTS / f"profile-{workload}.speedscope.json"
    code = ("import sys; from benchmarks import where_time_goes as w; "
            f"[w.stages_only({workload!r}, {quick!r}) for _ in range(2)]")
    subprocess.run([spy, "record", "-r", "400", "-f", "speedscope", "-o", str(path), "--",
                    sys.executable, "-c", code], cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": python_path()})
    return path


def stages_only(workload: str, quick: bool) -> None:
    """What the flame graph records: decoding and the pipeline with every detector, once."""
    from trainhealth.config import default_detector_settings
    from trainhealth.ingest import Decoder
    from trainhealth.pipeline import Pipeline, replay

    decoder = Decoder()
    if workload == "feed64":
        feed = Feed(workload)
        p = Pipeline(default_detector_settings())
        for _ in range(48):
            p.process(decoder.decode_body(feed.body(1000), "application/json").records)
    else:
        lines = long_trace(hours=2.0 if quick else 8.0)
        for _ in replay(map(decoder.decode_record, lines), Pipeline(default_detector_settings())):
            pass


def run(quick: bool = False, flames: bool = False) -> list[Figure]:
    figures: list[Figure] = []
    for workload in ("feed64", "long8"):
        figures += stages(workload, quick)
        if flames:
            flame(workload, quick)
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--flame", action="store_true", help="py-spy flame graphs (speedscope JSON)")
    args = ap.parse_args()
    print(table(run(args.quick, args.flame)))


if __name__ == "__main__":
    main()
