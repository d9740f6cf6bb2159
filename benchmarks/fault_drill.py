"""Fault drill: the real sidecar under 16 ranks (real clients, 10 records/s each), killed with -9 three
times at random moments and started again on the same --db and port; then stopped (SIGSTOP) for 15 s.

Four ranks hang for 8 s (rank_stalled fires, then resolves) and one diverges (nan_divergence fires),
spread so that kills land before, during and after them. A webhook receiver counts what was sent:
per (alert, rank, state) the transitions expected, lost (never sent) and duplicated in effect
(more than one distinct transition id; a redelivery of the same id is at-least-once and is counted apart).

    python -m benchmarks.fault_drill [--seed N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from tests.integration.alerting import Receiver, free_port

ROOT = Path(__file__).resolve().parent.parent
RANKS = 16
HANGS = {2: 60, 5: 160, 11: 260, 14: 360}  # rank -> step at which it hangs for HANG_SECONDS
HANG_SECONDS = 8
NAN = (9, 300)  # rank, step


def start_sidecar(port: int, db: str, cfg: str, hook: str, log: Path) -> subprocess.Popen[bytes]:
    """Its log goes to a file (a pipe nobody reads would fill and stop it: a pause of our own making)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINHEALTH_")}
    start = log.stat().st_size if log.exists() else 0
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "trainhealth", "serve", "--port", str(port), "--db", db,
                                 "--config", cfg, "--webhook", hook], env={**env, "PYTHONPATH": str(ROOT)},
                                stderr=out)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if re.search(rb"listening on", log.read_bytes()[start:]):
            return proc
        time.sleep(0.05)
    raise RuntimeError("sidecar did not start")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="fault-drill-"))
    cfg = tmp / "drill.toml"
    cfg.write_text("[server]\nstate_snapshot_seconds = 5\n[detectors.rank_stalled]\nfloor_seconds = 3\n"
                   "ceiling_seconds = 4\nstartup_seconds = 10\nsilence_floor_seconds = 5\n")
    receiver = Receiver().start()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    db = str(tmp / "drill.db")
    log = tmp / "sidecar.log"
    sidecar = start_sidecar(port, db, str(cfg), f"{receiver.url}/hook", log)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ranks = []
    for r in range(RANKS):
        hang_at = HANGS.get(r, 0)
        nan_at = NAN[1] if r == NAN[0] else 0
        ranks.append(subprocess.Popen([sys.executable, "-m", "tests.integration.rank_driver", url, "drill", str(r),
                                       str(RANKS), "0.1", str(hang_at), str(HANG_SECONDS), str(nan_at)],
                                      env=env, stderr=subprocess.DEVNULL))
    started = time.monotonic()
    kills = sorted(rng.uniform(8, 55) for _ in range(3))
    downtime = []
    try:
        for at in kills:
            time.sleep(max(0.0, at - (time.monotonic() - started)))
            sidecar.kill()
            sidecar.wait()
            t = time.monotonic()
            sidecar = start_sidecar(port, db, str(cfg), f"{receiver.url}/hook", log)
            downtime.append(time.monotonic() - t)
        time.sleep(max(0.0, 62 - (time.monotonic() - started)))
        sidecar.send_signal(signal.SIGSTOP)
        time.sleep(15)
        sidecar.send_signal(signal.SIGCONT)
        time.sleep(25)  # catch-up, then a verdict on anything the pause might have caused
    finally:
        for p in ranks:
            p.kill()
            p.wait()
        sidecar.terminate()
        sidecar.wait()
        receiver.stop()
    expected = Counter({("rank_stalled", r, s): 1 for r in HANGS for s in ("firing", "resolved")})
    expected[("nan_divergence", NAN[0], "firing")] = 1
    ids: dict[tuple[str, int, str], set[int]] = {}
    posts = 0
    for d in receiver.deliveries():
        a = d.json()
        ids.setdefault((a["alert"], a["rank"], a["state"]), set()).add(a["id"])
        posts += 1
    got = Counter({k: len(v) for k, v in ids.items()})
    lost = expected - got
    duplicated = got - expected
    print(json.dumps({
        "log": str(log), "kills_at_s": [round(k, 1) for k in kills], "restart_s": [round(d, 2) for d in downtime],
        "sigstop_s": 15, "expected_transitions": sum(expected.values()), "distinct_sent": sum(got.values()),
        "posts": posts, "redeliveries_same_id": posts - sum(got.values()),
        "lost": {"/".join(map(str, k)): v for k, v in lost.items()},
        "duplicated_or_unexpected": {"/".join(map(str, k)): v for k, v in duplicated.items()},
    }, indent=1))
    return 0 if not lost and not duplicated else 1


if __name__ == "__main__":
    sys.exit(main())
