"""What alerts out costs ingest: SQLite writes per batch, and Service.ingest with and without the store.

    python benchmarks/alerts_out.py

Prints medians; in-process (no HTTP), so the figures are the sidecar's own CPU per call.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainhealth import jsonout  # noqa: E402
from trainhealth.alerts import fingerprint  # noqa: E402
from trainhealth.assembly import build_service  # noqa: E402
from trainhealth.config import ServerSettings, Settings  # noqa: E402
from trainhealth.notify.store import Store, Transition  # noqa: E402
from trainhealth.service import Service  # noqa: E402


def median_time(fn, repeat: int = 30) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def store_rows_per_second(tmp: Path) -> None:
    store = Store(str(tmp / "bench.db"))
    for n in (1, 100, 1000):
        def write(n: int = n) -> None:
            transitions, outbox = [], []
            for i in range(n):
                alert = {"alert": "nan_divergence", "state": "firing", "severity": "critical", "run": "r",
                         "rank": i, "step": 1, "time": 1.0, "summary": "loss became nan at step 1 on rank 0",
                         "started_at": 1.0, "fingerprint": fingerprint(("r", i, "nan_divergence")),
                         "loss": math.nan, "id": store.new_id()}
                body = jsonout.dumps(alert)
                transitions.append(Transition(alert, alert["id"], False, body))
                outbox.append(("webhook x", f"k{alert['id']}", f"[{body}]"))
            store.write(transitions, [], outbox)
        t = median_time(write)
        print(f"encode + store.write of {n:4d} transitions (+{n} outbox rows), one commit: {t * 1e3:7.3f} ms "
              f"= {2 * n / t:,.0f} rows/s")
    store.close()


def batch(run: str, ranks: int, step: int, t: float, nan: bool = False) -> bytes:
    recs = [{"run": run, "rank": r, "time": t, "step": step, "loss": math.nan if nan else 2.0, "lr": 0.1,
             "grad_norm": 1.0, "host_mem_bytes": 1e9} for r in range(ranks)]
    return json.dumps(recs).encode()


def ingest_latency(tmp: Path, with_store: bool) -> None:
    label = "store on " if with_store else "store off"
    settings = Settings(server=ServerSettings(db=str(tmp / f"ingest-{with_store}.db"),
                                              webhooks=["http://127.0.0.1:9/x"]))
    service = build_service(settings)[0] if with_store else Service(settings)
    step = [0]

    def quiet(n: int) -> None:
        step[0] += 1
        service.ingest(batch("quiet", n, step[0], 1000.0 + step[0]), "application/json")

    for n in (1, 100, 1000):
        t = median_time(lambda n=n: quiet(n), 50)
        print(f"{label}: ingest {n:4d} healthy records: {t * 1e6:8.1f} us ({t * 1e6 / n:6.2f} us/record)")

    runs = iter(range(10_000))

    def alerting() -> None:  # every call: 8 new NaN alerts on a new run -> 8 rows + 8 outbox rows
        service.ingest(batch(f"nan{next(runs)}", 8, 1, 1000.0, nan=True), "application/json")

    t = median_time(alerting, 50)
    print(f"{label}: ingest 8 records raising 8 alerts (+webhook outbox): {t * 1e6:8.1f} us")
    service.close()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        store_rows_per_second(Path(d))
        ingest_latency(Path(d), with_store=False)
        ingest_latency(Path(d), with_store=True)
