"""The sidecar's own pause (SIGSTOP) is nobody's silence; a rank that really went silent is still caught.

Four ranks (real clients in their own processes) step every 0.1 s against the real sidecar with
small limits (silent after 3 s, stuck after 4 s). Rank 3 is killed (-9), then the sidecar is
stopped for 7 s (longer than both limits and than the clients' 5 s request timeout) while the others keep
sending, and continued: only rank 3 is reported.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.integration.alerting import config

pytestmark = pytest.mark.integration

LIMITS = """
[detectors.rank_stalled]
floor_seconds = 4
startup_seconds = 4
silence_floor_seconds = 3
"""


def ranks_at(sidecar, run: str) -> dict[int, int]:
    answer = sidecar.client.get(f"/v1/runs/{run}")
    if answer.status_code != 200:
        return {}
    return {int(r["rank"]): r["step"] or 0 for r in answer.json()["rank_states"]}


def stalled(sidecar) -> list[tuple[str, int]]:
    history = sidecar.client.get("/v1/alerts", params={"alert": "rank_stalled"}).json()["alerts"]
    # one incident per run (rank null): the ranks it convicts are its root ranks
    return sorted((a["state"], r) for a in history for r in ([a["rank"]] if a["rank"] is not None
                                                               else a.get("root_ranks") or [None]))


def test_sigstop_of_the_sidecar_convicts_no_healthy_rank_but_catches_the_dead_one(start_sidecar,
                                                                                    tmp_path: Path) -> None:
    sidecar = start_sidecar("--config", config(tmp_path, LIMITS))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ranks = [subprocess.Popen([sys.executable, "-m", "tests.integration.rank_driver", sidecar.url, "pause",
                               str(r), "4"], cwd=ROOT, env=env) for r in range(4)]
    try:
        deadline = time.monotonic() + 60
        while not (len(steps := ranks_at(sidecar, "pause")) == 4 and min(steps.values()) >= 20):
            assert time.monotonic() < deadline, f"ranks did not get going: {steps}"
            time.sleep(0.2)
        ranks[3].kill()  # a rank that really goes silent, without an `end`
        ranks[3].wait()
        time.sleep(0.5)
        sidecar.proc.send_signal(signal.SIGSTOP)
        time.sleep(7)  # the healthy ranks' requests time out (5 s) and are retried after back-off
        sidecar.proc.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 40
        while stalled(sidecar) != [("firing", 3)]:
            assert time.monotonic() < deadline, f"rank 3 not caught: {stalled(sidecar)}"
            assert not {r for _, r in stalled(sidecar)} - {3}, f"a healthy rank was convicted: {stalled(sidecar)}"
            time.sleep(0.5)
        time.sleep(5)  # the healthy ranks stay unconvicted after the catch-up
        assert stalled(sidecar) == [("firing", 3)]
        steps = ranks_at(sidecar, "pause")
        assert all(steps[r] > 150 for r in range(3)), steps  # they kept training and were read
    finally:
        for p in ranks:
            p.kill()
            p.wait()
