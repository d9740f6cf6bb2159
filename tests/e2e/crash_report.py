"""Run a module as __main__ and, if it dies of an exception, report it as the client's crash hook does
(issue 15: ``end`` with ``status: "failed"`` and the error), then re-raise.

    python -m tests.e2e.crash_report trainhealth.trainer --steps 1000

A stand-in for the client's own exception hook in e2e tests of the sidecar's side: with that hook the
sidecar gets the same record twice (the same rank's failed ``end``), which it takes as one.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import time
import traceback
import urllib.request


def report(exc: BaseException) -> None:
    from trainhealth.trainer import client

    live = list(getattr(client, "_LIVE", ()))
    tm = live[0] if live else None
    record = {
        "type": "end", "status": "failed", "time": time.time(),
        "run": tm.run if tm else os.environ.get("TRAINHEALTH_RUN", "local"),
        "rank": tm.rank if tm else int(os.environ.get("RANK", "0")),
        "step": (tm.last_step or 0) if tm else 0,
        "error": {"type": type(exc).__name__, "message": str(exc)[:2000],
                  "traceback": "".join(traceback.format_exception(exc))[-4000:]},
    }
    url = os.environ.get("TRAINHEALTH_URL", "http://127.0.0.1:9464").rstrip("/") + "/v1/ingest"
    request = urllib.request.Request(url, json.dumps([record]).encode(), {"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(request, timeout=5).read()
    except OSError as err:  # never hide the real error behind a telemetry one
        print(f"crash_report: could not send: {err}", file=sys.stderr)


def main() -> None:
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit:
        raise
    except BaseException as exc:
        report(exc)
        raise


if __name__ == "__main__":
    main()
