"""A real hang: two torchrun ranks (gloo, CPU) training with DDP; one stalls, the other blocks in
the all-reduce. The sidecar's timer reports it, and the alert names the stalled rank."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import IN_CI, ROOT, python_path

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

WORKER = Path(__file__).with_name("hang_worker.py")
STALL_RANK = 1
STALL_AT = 30


def test_stalled_rank_is_named_while_the_other_blocks_in_all_reduce(start_sidecar, tmp_path):
    if not IN_CI:
        pytest.importorskip("torch")
    cfg = tmp_path / "trainhealth.toml"
    cfg.write_text("[detectors.rank_stalled]\nfloor_seconds = 3.0\nsilence_floor_seconds = 10.0\n"
                   "startup_seconds = 30.0\n")
    sidecar = start_sidecar("--config", str(cfg))
    env = {**os.environ, "PYTHONPATH": python_path(), "TRAINHEALTH_URL": sidecar.url,
           "TRAINHEALTH_RUN": "real-hang", "STALL_RANK": str(STALL_RANK), "STALL_AT": str(STALL_AT),
           "OMP_NUM_THREADS": "1", "PID_DIR": str(tmp_path)}
    log = open(tmp_path / "torchrun.log", "w")
    ranks = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(WORKER)],
        cwd=str(ROOT), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        alerts: list[dict] = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not (alerts and alerts[0]["stuck_ranks"] == [0, 1]):
            assert ranks.poll() is None, (tmp_path / "torchrun.log").read_text()
            got = sidecar.client.get("/v1/alerts", params={"run": "real-hang", "state": "firing",
                                                           "alert": "rank_stalled"})
            alerts = got.json()["alerts"]
            time.sleep(0.2)
        assert alerts, "no rank_stalled alert:\n" + (tmp_path / "torchrun.log").read_text()
        (stalled,) = alerts  # one incident for the run: the waiting rank is in its fields, not paged
        assert stalled["rank"] is None and stalled["stuck_ranks"] == [0, 1]
        assert stalled["step"] == STALL_AT - 1 and stalled["reason"] == "stuck"
        assert stalled["heartbeats"] is True  # its heartbeat thread kept beating while it slept
        assert (stalled["first_rank"], stalled["root_ranks"], stalled["waiting_ranks"]) == (STALL_RANK,
                                                                                             [STALL_RANK], [0])
        # rank 0 finished the step and waits in the next
        assert f"rank {STALL_RANK} stopped first (at step {STALL_AT - 1}; rank 0 reached {STALL_AT} and " \
               f"waits in a collective)" in stalled["summary"]
    finally:
        stop(ranks, tmp_path)
        log.close()


def stop(launcher: subprocess.Popen, pid_dir: Path) -> None:
    """Kill what this test started: the launcher's session first (no new ranks after it), then
    each rank by the pid it wrote (torchrun gives every rank a session of its own)."""
    try:
        os.killpg(launcher.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    launcher.wait(10)
    for path in pid_dir.glob("rank*.pid"):
        try:
            os.kill(int(path.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
