"""Kill -9 the real sidecar run with a flight recorder, whose journal keeps the records' JSON texts as the bodies
held them (checkpoint.py TEXTS frames; a NaN sent as a bare NDJSON token among them), and start it again on the
same --db: the detectors resume where they were (the first NaN rank and step), nothing is sent twice, and the
flight recorder's file holds every record taken, as sent."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
from trainhealth.replay import ReadStats, read_files

from tests.integration.alerting import Receiver, ingest, oom_records

pytestmark = pytest.mark.integration


def sample(rank: int, step: int, **fields: Any) -> dict[str, Any]:
    return {"run": "rec", "rank": rank, "time": time.time(), "step": step, "loss": 1.0, **fields}


def firings(receiver: Receiver, alert: str) -> list[tuple[Any, ...]]:
    return [(d.json()["state"], d.json().get("first_rank"), d.json().get("first_step"))
            for d in receiver.deliveries() if d.json()["alert"] == alert]


def test_a_recorded_sidecar_resumes_from_the_journals_texts_after_a_kill(start_sidecar, receiver: Receiver,
                                                                         tmp_path: Path) -> None:
    args = ("--db", str(tmp_path / "rec.db"), "--record", str(tmp_path / "records"),
            "--webhook", f"{receiver.url}/hook")
    sidecar = start_sidecar(*args, db=False)
    ingest(sidecar, [{"type": "start", "run": "rec", "rank": r, "time": time.time(), "world_size": 4}
                     for r in range(4)])
    for step in range(1, 10):
        ingest(sidecar, [sample(r, step) for r in range(4)])
    nan_line = b'{"run":"rec","rank":2,"time":%.3f,"step":10,"loss":NaN}' % time.time()
    resp = sidecar.client.post("/v1/ingest", content=nan_line, headers={"Content-Type": "application/x-ndjson"})
    assert resp.status_code == 200 and resp.json()["alerts"] == 1
    receiver.wait_for(lambda: firings(receiver, "nan_divergence") == [("firing", 2, 10)], what="rank 2's NaN")
    sidecar.stop(kill=True)  # no snapshot was due (30 s): the restart replays the journal alone

    again = start_sidecar(*args, db=False)
    ingest(again, [sample(0, 11, loss=math.nan), sample(1, 11, loss=math.nan)])
    findings = again.client.get("/v1/runs/rec").json()["findings"]["nan_divergence"]
    assert (findings["first_rank"], findings["first_step"]) == (2, 10)
    ingest(again, oom_records("marker", [0]))  # delivered after whatever the restart sent
    receiver.wait_for(lambda: any(d.json()["alert"] == "gpu_oom" for d in receiver.deliveries()),
                      what="the marker alert")
    assert firings(receiver, "nan_divergence").count(("firing", 2, 10)) == 1  # not sent again by the restart
    stats = ReadStats()
    recorded = list(read_files([str(tmp_path / "records" / "rec.jsonl")], stats))
    assert stats.skipped == 0 and len(recorded) == 4 + 36 + 1 + 2
    assert nan_line in (tmp_path / "records" / "rec.jsonl").read_bytes().splitlines()
    assert [r.step for r in recorded if r.loss is not None and math.isnan(r.loss)] == [10, 11, 11]
    assert json.loads(again.client.get("/healthz").text)["status"] == "ok"
