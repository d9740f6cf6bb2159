"""The demo's alert feed: prints each alert transition of one run as the sidecar records it.

    python scripts/demo_alerts.py URL RUN [--until-file PATH] [--quiet SECONDS]

Polls ``GET /v1/alerts?run=RUN`` twice a second and prints the transitions it has not printed, oldest
first (by time, then step); a run-level alert (rank null: one incident for the whole run) says "run".
Stops once PATH exists (the demo creates it when the job is over) and nothing new came for SECONDS since
then (default 5: a rank that died without a word is named a couple of seconds after its peer's collective
broke, when the job may already be over).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


def line(a: dict[str, Any]) -> str:
    where = "run" if a.get("rank") is None else f"rank {a['rank']}"
    step = "-" if a.get("step") is None else str(a["step"])
    stamp = time.strftime("%H:%M:%S", time.gmtime(a["time"]))
    return f"  {stamp}  step {step:>5}  {a['severity']:<8} {a['alert']:<16} {a['state']:<8} {where:<7}  {a['summary']}"


def fetch(url: str, run: str) -> list[dict[str, Any]]:
    query = urllib.parse.urlencode({"run": run, "limit": 1000})
    with urllib.request.urlopen(f"{url}/v1/alerts?{query}", timeout=5) as answer:
        alerts: list[dict[str, Any]] = json.load(answer)["alerts"]
    return alerts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url")
    p.add_argument("run")
    p.add_argument("--until-file")
    p.add_argument("--quiet", type=float, default=5.0)
    args = p.parse_args()
    seen: set[int] = set()
    quiet_since, was_done = time.monotonic(), False
    while True:
        try:
            new = [a for a in fetch(args.url, args.run) if a["id"] not in seen]
        except (OSError, urllib.error.URLError, ValueError, KeyError) as exc:
            print(f"  (cannot read {args.url}/v1/alerts: {exc})", file=sys.stderr)
            new = []
        for a in sorted(new, key=lambda a: (a["time"], a.get("step") or 0, a["id"])):
            seen.add(a["id"])
            print(line(a), flush=True)
        done = bool(args.until_file) and os.path.exists(args.until_file)
        if new or (done and not was_done):  # quiet counts from the last alert or the job's end, the later
            quiet_since = time.monotonic()
        was_done = done
        if done and time.monotonic() - quiet_since > args.quiet:
            return 0
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())
