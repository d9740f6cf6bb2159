"""Kill -9 the real sidecar and start it again on the same --db: the detectors resume where they were.

Each scenario runs twice: with a snapshot taken before the kill (state_snapshot_seconds 0.3), and
with the journal alone (no snapshot yet). A webhook receiver counts what was sent: every alert
ends in the state it would have reached without the kill, none is sent twice.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.alerting import Receiver, config, ingest

pytestmark = pytest.mark.integration


def settings(tmp_path: Path, snapshot: float) -> str:
    return config(tmp_path, f"""
[server]
state_snapshot_seconds = {snapshot}

[detectors.rank_stalled]
floor_seconds = 2
startup_seconds = 2
silence_floor_seconds = 60
""")


def sample(run: str, rank: int, step: int, **fields: Any) -> dict[str, Any]:
    return {"run": run, "rank": rank, "time": time.time(), "step": step, "loss": 1.0, **fields}


def root(alert: dict[str, Any]) -> int | None:
    """The rank an alert is about: its rank, or a run-level incident's first (root) rank."""
    return alert["rank"] if alert["rank"] is not None else alert.get("first_rank")


def sent(receiver: Receiver, alert: str) -> list[tuple[str, int | None]]:
    return [(d.json()["state"], root(d.json())) for d in receiver.deliveries() if d.json()["alert"] == alert]


@pytest.mark.parametrize("snapshot", [0.3, 3600.0], ids=["snapshot", "journal-only"])
def test_rank_stalled_open_at_a_kill_resolves_when_the_rank_resumes_after_restart(
        start_sidecar, receiver: Receiver, tmp_path: Path, snapshot: float) -> None:
    args = ("--config", settings(tmp_path, snapshot), "--db", str(tmp_path / "kill.db"),
            "--webhook", f"{receiver.url}/hook")
    sidecar = start_sidecar(*args, db=False)
    ingest(sidecar, [{"type": "start", "run": "job", "rank": r, "time": time.time(), "world_size": 2}
                     for r in (0, 1)])
    step = 0
    for step in range(1, 6):
        ingest(sidecar, [sample("job", 0, step), sample("job", 1, step)])
        time.sleep(0.05)
    deadline = time.monotonic() + 20
    while sent(receiver, "rank_stalled") != [("firing", 1)]:  # rank 1 hangs at step 5, heartbeats go on
        assert time.monotonic() < deadline, f"no stall reported: {sent(receiver, 'rank_stalled')}"
        step += 1
        ingest(sidecar, [sample("job", 0, step),
                         {"type": "heartbeat", "run": "job", "rank": 1, "time": time.time(), "step": 5}])
        time.sleep(0.1)
    time.sleep(1.0)  # a snapshot (0.3 s) is taken with the alert open
    sidecar.stop(kill=True)
    assert sidecar.proc.returncode == -9

    again = start_sidecar(*args, db=False)
    assert [root(a) for a in again.client.get("/v1/alerts", params={"state": "firing"}).json()["alerts"]] == [1]
    for _ in range(5):  # rank 1 finishes steps again
        step += 1
        ingest(again, [sample("job", 0, step), sample("job", 1, step)])
        time.sleep(0.1)
    receiver.wait_for(lambda: len(sent(receiver, "rank_stalled")) >= 2, what="the resolve after the restart")
    time.sleep(1.0)  # nothing more may come
    assert sent(receiver, "rank_stalled") == [("firing", 1), ("resolved", 1)]
    assert again.client.get("/v1/alerts", params={"state": "firing"}).json()["alerts"] == []


@pytest.mark.parametrize("snapshot", [0.3, 3600.0], ids=["snapshot", "journal-only"])
def test_first_nan_rank_is_kept_across_a_kill(start_sidecar, receiver: Receiver, tmp_path: Path,
                                              snapshot: float) -> None:
    args = ("--config", settings(tmp_path, snapshot), "--db", str(tmp_path / "nan.db"),
            "--webhook", f"{receiver.url}/hook")
    sidecar = start_sidecar(*args, db=False)
    ingest(sidecar, [{"type": "start", "run": "div", "rank": r, "time": time.time(), "world_size": 4}
                     for r in range(4)])
    for step in range(1, 10):
        ingest(sidecar, [sample("div", r, step) for r in range(4)])
    ingest(sidecar, [sample("div", 2, 10, loss=float("nan"))])  # rank 2 diverges first
    receiver.wait_for(lambda: sent(receiver, "nan_divergence") == [("firing", 2)], what="rank 2's NaN alert")
    time.sleep(1.0)
    sidecar.stop(kill=True)

    again = start_sidecar(*args, db=False)
    ingest(again, [sample("div", 0, 11, loss=float("nan")), sample("div", 1, 11, loss=float("nan"))])
    findings = again.client.get("/v1/runs/div").json()["findings"]["nan_divergence"]
    assert (findings["first_rank"], findings["first_step"]) == (2, 10)
    time.sleep(1.0)
    later = [d.json() for d in receiver.deliveries() if d.json()["alert"] == "nan_divergence"][1:]
    assert all(a["first_rank"] == 2 and a["first_step"] == 10 for a in later), later
    assert sent(receiver, "nan_divergence").count(("firing", 2)) == 1  # not sent again by the restart
