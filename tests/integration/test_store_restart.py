"""Kill -9 and restart on the same --db: no alert lost, undelivered notifications re-sent, open ones kept."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.integration.alerting import Receiver, config, ingest, nan_records, oom_records

pytestmark = pytest.mark.integration


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.release()
    r.stop()


def test_sigkill_mid_delivery_then_restart_loses_nothing(start_sidecar, receiver, tmp_path: Path) -> None:
    db = str(tmp_path / "kill.db")
    cfg = config(tmp_path, f"""
[[webhooks]]
url = "{receiver.url}/hook"
backoff_initial = 0.2
backoff_max = 0.5
""")
    receiver.hold()
    sidecar = start_sidecar("--config", cfg, "--db", db, db=False)
    assert ingest(sidecar, oom_records("kill", range(5)))["alerts"] == 5
    receiver.wait_for(lambda: receiver.in_flight == 1, what="the first delivery in flight")
    sidecar.stop(kill=True)  # SIGKILL while the receiver holds the first notification
    assert sidecar.proc.returncode == -9
    receiver.release()

    again = start_sidecar("--config", cfg, "--db", db, db=False)
    history = again.client.get("/v1/alerts", params={"state": "firing"}).json()["alerts"]
    assert sorted(a["rank"] for a in history) == [0, 1, 2, 3, 4]  # every raised alert survived
    receiver.wait_for(lambda: len(receiver.by_key()) == 5, what="all 5 notifications")
    by_key = receiver.by_key()
    first = receiver.deliveries()[0]
    assert len(by_key[first.key]) == 2  # the one cut off by the kill came again, same key, same body
    assert {d.body for d in by_key[first.key]} == {first.body}
    assert sorted(ds[0].json()["rank"] for ds in by_key.values()) == [0, 1, 2, 3, 4]
    assert sorted(ds[0].json()["id"] for ds in by_key.values()) == sorted(a["id"] for a in history)


def test_open_alert_survives_restart_stays_acknowledged_and_resolves_after(start_sidecar, receiver,
                                                                           tmp_path: Path) -> None:
    db = str(tmp_path / "restart.db")
    cfg = config(tmp_path, "[limits]\nrun_ttl_seconds = 2\n")
    args = ("--config", cfg, "--db", db, "--webhook", f"{receiver.url}/hook")
    sidecar = start_sidecar(*args, db=False)
    ingest(sidecar, nan_records("long-job", [0]))
    receiver.wait_for(lambda: len(receiver.deliveries()) == 1, what="the firing notification")
    alert_id = receiver.deliveries()[0].json()["id"]
    acked = sidecar.client.post(f"/v1/alerts/{alert_id}/ack", json={"by": "alice", "comment": "restarting"})
    assert acked.status_code == 200 and acked.json()["acknowledged"] is True
    assert sidecar.client.post("/v1/alerts/999/ack").status_code == 404
    sidecar.stop(kill=True)

    again = start_sidecar(*args, db=False)
    (restored,) = again.client.get("/v1/alerts", params={"state": "firing"}).json()["alerts"]
    assert (restored["id"], restored["acknowledged_by"]) == (alert_id, "alice")
    assert ingest(again, nan_records("long-job", [0], step=11))["alerts"] == 0  # still open: deduplicated
    receiver.wait_for(lambda: len(receiver.deliveries()) == 2, what="the resolve after the run expired")
    resolved = receiver.deliveries()[1].json()
    assert (resolved["state"], resolved["rank"], resolved["started_at"]) == ("resolved", None, restored["time"])
    assert again.client.get("/v1/alerts", params={"state": "firing"}).json()["alerts"] == []
    states = [(a["state"], a["acknowledged"]) for a in again.client.get("/v1/alerts").json()["alerts"]]
    assert states == [("resolved", True), ("firing", True)]
