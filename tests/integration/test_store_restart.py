"""Kill -9 and restart on the same --db: no alert lost, undelivered notifications re-sent, open ones kept.

What a receiver may see twice, and only then: a notification it answered 2xx when the sidecar died before
its record of that answer reached the disk (docs/alerts.md, "Delivery"). Once an alert's ``delivery`` says
``delivered``, no kill sends it again; a re-send carries the same ``Idempotency-Key``, body bytes and ``id``.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.integration.alerting import Delivery, config, ingest, nan_records, oom_records, until

pytestmark = pytest.mark.integration


def delivery_state(sidecar: Any, alert_id: int) -> str:
    (alert,) = [a for a in sidecar.client.get("/v1/alerts").json()["alerts"] if a["id"] == alert_id]
    (d,) = alert["delivery"]
    return str(d["state"])


def one_identity_per_id(deliveries: list[Delivery]) -> dict[int, list[Delivery]]:
    """Deliveries by the transition ``id`` they carry; a transition posted twice was the same notification."""
    by_id: dict[int, list[Delivery]] = {}
    for d in deliveries:
        by_id.setdefault(d.json()["id"], []).append(d)
    for i, ds in by_id.items():
        assert {(d.key, d.body) for d in ds} == {(ds[0].key, ds[0].body)}, f"id {i} posted as two notifications"
    return by_id


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
    assert sorted(len(ds) for ds in one_identity_per_id(receiver.deliveries()).values()) == [1, 1, 1, 1, 2]
    assert sorted(ds[0].json()["rank"] for ds in by_key.values()) == [0, 1, 2, 3, 4]
    assert sorted(ds[0].json()["id"] for ds in by_key.values()) == sorted(a["id"] for a in history)


def test_open_alert_survives_restart_stays_acknowledged_and_resolves_after(start_sidecar, receiver,
                                                                           tmp_path: Path) -> None:
    db = str(tmp_path / "restart.db")
    # the run expires 4 s after its last record: not before the kill below, even on a loaded machine
    cfg = config(tmp_path, "[limits]\nrun_ttl_seconds = 4\n")
    args = ("--config", cfg, "--db", db, "--webhook", f"{receiver.url}/hook")
    sidecar = start_sidecar(*args, db=False)
    ingest(sidecar, nan_records("long-job", [0]))
    receiver.wait_for(lambda: len(receiver.deliveries()) == 1, what="the firing notification")
    alert_id = receiver.deliveries()[0].json()["id"]
    # the receiver has it; the sidecar knows so once the row is gone from the outbox: only then is the kill
    # below past the window in which a notification is sent again (the next test kills inside it)
    until(lambda: delivery_state(sidecar, alert_id) == "delivered", what="the firing marked delivered")
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
    assert [d.json()["state"] for d in receiver.deliveries()] == ["firing", "resolved"]  # nothing sent twice
    assert len(one_identity_per_id(receiver.deliveries())) == 2


def test_kill_after_the_receiver_answered_but_before_the_mark_resends_once_with_the_same_identity(
        start_sidecar, receiver, tmp_path: Path) -> None:
    """The one window at-least-once delivery leaves: the receiver took the POST (2xx), the sidecar died before
    the outbox row's delete reached the file. Made certain here by holding SQLite's write lock from the test
    (another process), so the delete cannot commit, and killing the sidecar once the 2xx is written."""
    db = str(tmp_path / "window.db")
    cfg = config(tmp_path, f"""
[[webhooks]]
url = "{receiver.url}/hook"
secret = "shared"
backoff_initial = 0.2
backoff_max = 0.5
""")
    args = ("--config", cfg, "--db", db)
    receiver.hold()
    sidecar = start_sidecar(*args, db=False)
    assert ingest(sidecar, nan_records("window", [0]))["alerts"] == 1
    receiver.wait_for(lambda: receiver.in_flight == 1, what="the firing in flight")
    lock = sqlite3.connect(db, timeout=30, isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")  # from now on the sidecar cannot commit "delivered"
        receiver.release()
        receiver.wait_for(lambda: receiver.answered == 1, what="the receiver's 2xx")
        sidecar.stop(kill=True)
        assert sidecar.proc.returncode == -9
    finally:
        lock.execute("ROLLBACK")
        lock.close()

    again = start_sidecar(*args, db=False)
    receiver.wait_for(lambda: len(receiver.deliveries()) == 2, what="the re-send after the restart")
    first, resent = receiver.deliveries()
    until(lambda: delivery_state(again, first.json()["id"]) == "delivered", what="the re-send marked delivered")
    assert (resent.key, resent.body, resent.headers["x-trainhealth-signature"]) == (
        first.key, first.body, first.headers["x-trainhealth-signature"])  # the same notification: deduplicable
    assert (first.json()["state"], first.json()["run"]) == ("firing", "window")
    assert len(receiver.deliveries()) == receiver.answered == 2  # delivered now: no third post, and no other
    assert [a["id"] for a in again.client.get("/v1/alerts").json()["alerts"]] == [first.json()["id"]]
