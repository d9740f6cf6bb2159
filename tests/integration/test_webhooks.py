"""Webhooks against a real receiver (an HTTP server on 127.0.0.1) and the real sidecar."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import sqlite3
import time
from pathlib import Path
from typing import Iterator

import pytest
from trainhealth.notify.delivery import Deliverer, outbox_rows
from trainhealth.notify.store import Store
from trainhealth.notify.webhooks import WebhookSettings, target

from tests.integration.alerting import Receiver, config, ingest, nan_records, oom_records

pytestmark = pytest.mark.integration


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.release()
    r.stop()


def test_alert_is_posted_signed_with_an_idempotency_key_in_both_formats(start_sidecar, receiver,
                                                                        tmp_path: Path) -> None:
    receiver.start()
    cfg = config(tmp_path, f"""
[[webhooks]]
url = "{receiver.url}/trainhealth"
secret = "s3cret"

[[webhooks]]
url = "{receiver.url}/am"
format = "alertmanager"
""")
    sidecar = start_sidecar("--config", cfg)
    assert ingest(sidecar, nan_records("job-1", [3]))["alerts"] == 1
    receiver.wait_for(lambda: len(receiver.deliveries()) == 2, what="two deliveries")

    (th,) = receiver.deliveries("/trainhealth")
    alert = th.json()
    assert (alert["alert"], alert["state"], alert["run"], alert["rank"], alert["loss"]) == (
        "nan_divergence", "firing", "job-1", None, "NaN")  # NaN stays NaN, never null; one alert per run
    assert alert["id"] == sidecar.client.get("/v1/alerts").json()["alerts"][0]["id"]
    assert len(th.key) == 32
    expected = "sha256=" + hmac.new(b"s3cret", th.body, hashlib.sha256).hexdigest()
    assert th.headers["x-trainhealth-signature"] == expected

    (am,) = receiver.deliveries("/am")
    payload = am.json()
    assert (payload["version"], payload["status"]) == ("4", "firing")
    assert payload["alerts"][0]["labels"] == {"alertname": "nan_divergence", "run": "job-1",
                                              "severity": "critical", "source": "trainhealth"}
    assert "x-trainhealth-signature" not in am.headers
    assert am.key != th.key


def test_receiver_down_for_a_while_gets_every_alert_once_per_key(start_sidecar, receiver,
                                                                 tmp_path: Path) -> None:
    cfg = config(tmp_path, f"""
[[webhooks]]
url = "{receiver.url}/hook"
backoff_initial = 0.2
backoff_max = 0.5
""")
    sidecar = start_sidecar("--config", cfg, "--db", str(tmp_path / "t.db"), db=False)
    for rank in range(5):
        assert ingest(sidecar, oom_records("down", [rank]))["alerts"] == 1

    def attempts() -> int:
        with sqlite3.connect(tmp_path / "t.db") as db:
            return int(db.execute("SELECT COALESCE(MAX(attempts), 0) FROM outbox").fetchone()[0])

    deadline = time.monotonic() + 15
    while attempts() < 3:  # the sidecar keeps trying while the receiver is down
        assert time.monotonic() < deadline, "no retries recorded in the outbox"
        time.sleep(0.1)
    receiver.start()
    receiver.wait_for(lambda: len(receiver.by_key()) == 5, what="5 notifications")
    time.sleep(1.0)  # nothing more comes
    by_key = receiver.by_key()
    assert len(by_key) == 5
    for deliveries in by_key.values():
        assert len({d.body for d in deliveries}) == 1  # a re-send is the same notification
    first_seen = [d.json()["rank"] for d in receiver.deliveries() if d is by_key[d.key][0]]
    assert first_seen == [0, 1, 2, 3, 4]  # in the order raised
    assert len(sidecar.client.get("/v1/alerts").json()["alerts"]) == 5


def test_slow_receiver_does_not_hold_up_ingest(start_sidecar, receiver) -> None:
    receiver.start()
    receiver.hold()  # every request waits until released
    sidecar = start_sidecar("--webhook", f"{receiver.url}/slow")
    ingest(sidecar, oom_records("slow", [0]))
    receiver.wait_for(lambda: receiver.in_flight == 1, what="a delivery in flight")
    latencies = []
    for step in range(11, 41):
        t0 = time.perf_counter()
        body = ingest(sidecar, oom_records("slow", [step - 10], step=step))
        latencies.append(time.perf_counter() - t0)
        assert body["accepted"] == 1
    assert receiver.in_flight == 1  # all 30 batches were answered while the receiver sat on the first
    assert max(latencies) < 0.5, latencies
    receiver.release()
    receiver.wait_for(lambda: len(receiver.by_key()) == 31, what="31 notifications")


def test_silenced_alert_is_stored_and_posted_only_once_its_silence_ends(start_sidecar, receiver) -> None:
    receiver.start()
    sidecar = start_sidecar("--webhook", f"{receiver.url}/hook")
    resp = sidecar.client.post("/v1/silences", json={"run": "quiet", "until": time.time() + 600,
                                                     "comment": "known flaky node"})
    assert resp.status_code == 201, resp.text
    silence = resp.json()
    bad = sidecar.client.post("/v1/silences", json={"run": "quiet", "until": "soon"})
    assert bad.status_code == 400 and bad.json()["error"].startswith("until: must be unix seconds")
    ingest(sidecar, nan_records("quiet", [0]) + nan_records("loud", [0]))
    receiver.wait_for(lambda: len(receiver.deliveries()) == 1, what="the loud alert")
    time.sleep(1.5)  # a silence-check tick passes: still only the loud one
    assert [d.json()["run"] for d in receiver.deliveries()] == ["loud"]
    (quiet,) = sidecar.client.get("/v1/alerts", params={"run": "quiet"}).json()["alerts"]
    assert quiet["silenced"] is True and quiet["state"] == "firing"
    listed = sidecar.client.get("/v1/silences").json()["silences"]
    assert [s["id"] for s in listed] == [silence["id"]]

    assert sidecar.client.delete(f"/v1/silences/{silence['id']}").status_code == 200
    receiver.wait_for(lambda: len(receiver.deliveries()) == 2, what="the quiet alert after its silence")
    assert receiver.deliveries()[1].json()["run"] == "quiet"
    assert sidecar.client.get("/v1/silences").json()["silences"] == []
    assert sidecar.client.delete("/v1/silences/999").status_code == 404


def test_delivery_stats_count_ok_retry_and_dropped(receiver, tmp_path: Path) -> None:
    """In-process Deliverer against the real receiver: 503 is retried, 400 is dropped, each counted."""
    receiver.start()
    store = Store(str(tmp_path / "stats.db"))
    settings = WebhookSettings(url=f"{receiver.url}/hook", backoff_initial=0.05, backoff_max=0.1)
    deliverer = Deliverer(store, [target(settings)])
    alert = {"alert": "nan_divergence", "state": "firing", "severity": "critical", "run": "s", "rank": 0,
             "step": 1, "time": 1.0, "summary": "x", "started_at": 1.0, "fingerprint": "s/0/nan_divergence"}

    async def scenario() -> dict:
        task = asyncio.create_task(deliverer.run())
        receiver.status = 503
        rows = outbox_rows(deliverer.targets, [alert])
        store.write([], [], rows)
        deliverer.enqueued(rows)
        while len(receiver.deliveries()) < 3:  # retried while the receiver says 503
            await asyncio.sleep(0.02)
        receiver.status = 200
        while deliverer.delivery_stats()["deliveries"]["ok"] < 1:
            await asyncio.sleep(0.02)
        receiver.status = 400
        rows = outbox_rows(deliverer.targets, [alert])
        store.write([], [], rows)
        deliverer.enqueued(rows)
        while deliverer.delivery_stats()["deliveries"]["failed"] < 1:
            await asyncio.sleep(0.02)
        task.cancel()
        return deliverer.delivery_stats()

    stats = asyncio.run(asyncio.wait_for(scenario(), 20))
    store.close()
    assert stats["deliveries"]["ok"] == 1 and stats["deliveries"]["failed"] == 1
    assert stats["deliveries"]["retry"] == len(receiver.deliveries()) - 2 >= 2
    assert stats["outbox_depth"] == 0
    (per_target,) = stats["targets"]
    assert per_target["name"] == f"127.0.0.1:{receiver.port}" and per_target["last_error"].startswith("HTTP 400")
    assert len({d.key for d in receiver.deliveries()}) == 2  # one key per notification, across its retries
