"""rank_stalled on the real sidecar: time passes without records, and the server's timer reports it.

Small limits come from a ``--config`` TOML file so each test takes seconds:
a stall limit of 2 s (steps here take 0.05 s); for silence 1.5 s, with a 5 s stall
limit so that silence is what fires.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

FLOOR = 2.0
SILENCE = 1.5


def config(tmp_path: Path, floor: float = FLOOR, silence: float = 30.0, factor: float = 3.0) -> str:
    path = tmp_path / "trainhealth.toml"
    path.write_text(f"""
[detectors.rank_stalled]
factor = {factor}
floor_seconds = {floor}
silence_floor_seconds = {silence}
startup_seconds = {floor}
""")
    return str(path)


def post(sidecar, *records: dict) -> None:
    answer = sidecar.client.post("/v1/ingest", json=list(records))
    assert answer.status_code == 200, answer.text
    assert answer.json()["rejected"] == 0


def firing(sidecar, run: str) -> list[dict]:
    answer = sidecar.client.get("/v1/alerts", params={"run": run, "state": "firing",
                                                      "alert": "rank_stalled"})
    assert answer.status_code == 200
    return answer.json()["alerts"]


def train(sidecar, run: str, last_step: dict[int, int]) -> dict[int, float]:
    """Start, then sample steps 0.05 s apart until each rank's last step; returns its time."""
    post(sidecar, *({"type": "start", "run": run, "rank": r, "time": time.time(), "world_size": 2}
                    for r in last_step))
    when: dict[int, float] = {}
    for step in range(1, max(last_step.values()) + 1):
        now = time.time()
        batch = [{"run": run, "rank": r, "time": now, "step": step, "loss": 1.0}
                 for r, last in last_step.items() if step <= last]
        post(sidecar, *batch)
        for rec in batch:
            when[rec["rank"]] = now
        time.sleep(0.05)
    return when


def heartbeat(sidecar, run: str, steps: dict[int, int]) -> float:
    """One heartbeat of each rank, all at one time; returns that time."""
    now = time.time()
    post(sidecar, *({"type": "heartbeat", "run": run, "rank": r, "time": now, "step": s}
                    for r, s in steps.items()))
    return now


def wait_for(sidecar, run: str, rank: int, deadline: float) -> dict | None:
    """The run's one rank_stalled alert, once it names ``rank`` among the stalled ranks."""
    while time.time() < deadline:
        for alert in firing(sidecar, run):
            if rank in alert["silent_ranks"] + alert["stuck_ranks"]:
                return alert
        time.sleep(0.05)
    return None


def test_stuck_steps_with_heartbeats_fire_from_the_timer(start_sidecar, tmp_path):
    sidecar = start_sidecar("--config", config(tmp_path))
    run = "hang-with-heartbeats"
    last = train(sidecar, run, {0: 20, 1: 19})  # rank 1 stops first, rank 0 blocks after step 20
    heartbeat(sidecar, run, {0: 20, 1: 19})
    beat_at = time.time()
    # the next heartbeat is 5 s away: an alert before it can only come from the server's timer
    alert = wait_for(sidecar, run, 1, deadline=beat_at + 4.5)
    seen = time.time()
    assert alert is not None, "no rank_stalled alert from the timer"
    assert seen - last[1] >= FLOOR
    assert seen - last[1] < FLOOR + 2.5  # tick every second, plus the poll
    assert alert["time"] == pytest.approx(last[1] + FLOOR, abs=0.05)  # when the limit was crossed
    assert alert["reason"] == "stuck" and alert["severity"] == "critical"
    assert alert["first_rank"] == 1 and alert["step"] == 19
    assert alert["summary"].startswith("rank 1 is stuck after step 19")
    # heartbeats keep coming: still one alert for the run, now listing both ranks, naming rank 1
    for _ in range(3):
        time.sleep(0.5)
        heartbeat(sidecar, run, {0: 20, 1: 19})
    (alert,) = firing(sidecar, run)
    assert alert["rank"] is None and alert["first_rank"] == 1 and alert["stuck_ranks"] == [0, 1]
    findings = sidecar.client.get(f"/v1/runs/{run}").json()["findings"]["rank_stalled"]
    assert (findings["root_ranks"], findings["waiting_ranks"]) == ([1], [0])
    # the job moves on: the incident resolves on their next step
    now = time.time()
    post(sidecar, {"run": run, "rank": 1, "time": now, "step": 20}, {"run": run, "rank": 0, "time": now,
                                                                    "step": 21})
    assert firing(sidecar, run) == []
    resolved = sidecar.client.get("/v1/alerts", params={"run": run, "state": "resolved"}).json()["alerts"]
    assert [a["rank"] for a in resolved] == [None]


def test_rank_that_stops_sending_anything_fires_from_the_timer(start_sidecar, tmp_path):
    # factor 1: the silence limit stays the floor unless a gap between rank 0's beats (0.5 s apart) passes
    # 1.5 s, so a loaded machine does not stretch it
    sidecar = start_sidecar("--config", config(tmp_path, floor=5.0, silence=SILENCE, factor=1.0))
    run = "dead-rank"
    train(sidecar, run, {0: 10, 1: 10})
    last = heartbeat(sidecar, run, {0: 10, 1: 10})  # rank 1's last word
    # rank 1 is killed; rank 0 blocks in the all-reduce and keeps beating every 0.5 s
    gone = time.time()
    alert = None
    while alert is None and time.time() < gone + 5:
        heartbeat(sidecar, run, {0: 10})
        alert = wait_for(sidecar, run, 1, deadline=time.time() + 0.5)
    assert alert is not None, "no alert for the silent rank"
    assert alert["reason"] == "silent" and alert["first_rank"] == 1
    assert alert["summary"].startswith("rank 1 went silent after step 10")
    assert alert["time"] == pytest.approx(last + SILENCE, abs=0.01)  # the crossing, not the tick that saw it


def test_whole_job_gone_fires_from_the_timer_alone(start_sidecar, tmp_path):
    sidecar = start_sidecar("--config", config(tmp_path, floor=5.0, silence=SILENCE))
    run = "all-gone"
    train(sidecar, run, {0: 10})
    heartbeat(sidecar, run, {0: 10})
    gone = time.time()
    alert = wait_for(sidecar, run, 0, deadline=gone + 5)  # no record at all after this point
    assert alert is not None
    assert alert["reason"] == "silent"
    assert time.time() - gone < SILENCE + 2.5


def test_run_that_ended_is_not_reported(start_sidecar, tmp_path):
    sidecar = start_sidecar("--config", config(tmp_path, silence=SILENCE))
    run = "finished"
    train(sidecar, run, {0: 10, 1: 10})
    post(sidecar, *({"type": "end", "run": run, "rank": r, "time": time.time(), "step": 10} for r in (0, 1)))
    time.sleep(FLOOR + 2)
    assert firing(sidecar, run) == []
