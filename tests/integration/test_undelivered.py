"""Undeliverable alerts against the real sidecar and a real receiver: a 404 keeps the alert as undelivered
(visible in GET /v1/alerts and /metrics, kept across a restart), later alerts still go out, and once the
receiver is fixed a redeliver sends each exactly once."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..conftest import ROOT
from .alerting import ingest, nan_records, until


def undelivered_metric(sc: Any, target: str) -> float:
    prefix = f'trainhealth_webhook_undelivered{{target="{target}"}} '
    (line,) = [ln for ln in sc.client.get("/metrics").text.splitlines() if ln.startswith(prefix)]
    return float(line.rsplit(" ", 1)[1])


def delivery(sc: Any, run: str) -> dict[str, Any]:
    (alert,) = sc.client.get("/v1/alerts", params={"run": run}).json()["alerts"]
    (d,) = alert["delivery"]
    return {"id": alert["id"], **d}


def test_a_404_keeps_alerts_undelivered_until_redelivered_once_each(start_sidecar, receiver,
                                                                    tmp_path: Path) -> None:
    db = str(tmp_path / "kept.db")
    sc = start_sidecar("--webhook", f"{receiver.url}/hook", "--db", db, db=False)
    name = f"127.0.0.1:{receiver.port}"
    receiver.status = 404  # a mistyped path, say
    ingest(sc, nan_records("a", [0]))
    ingest(sc, nan_records("b", [0]))
    until(lambda: delivery(sc, "b")["state"] == "undelivered", what="both undelivered")
    a, b = delivery(sc, "a"), delivery(sc, "b")
    assert (a["target"], a["state"], a["error"].split(":")[0]) == (name, "undelivered", "HTTP 404")
    assert b["state"] == "undelivered"  # the first failure does not block the next alert
    assert len(receiver.deliveries()) == 2 and undelivered_metric(sc, name) == 2
    listed = sc.client.get("/v1/alerts", params={"delivery": "undelivered"}).json()["alerts"]
    assert [x["run"] for x in listed] == ["b", "a"]
    assert sc.client.get("/v1/alerts", params={"delivery": "lost"}).status_code == 400

    sc.stop()  # kept across a restart
    sc = start_sidecar("--webhook", f"{receiver.url}/hook", "--db", db, db=False)
    assert delivery(sc, "a")["state"] == "undelivered" and undelivered_metric(sc, name) == 2
    time.sleep(1.0)
    assert len(receiver.deliveries()) == 2  # not retried on its own

    receiver.status = 200  # fixed
    r = sc.client.post(f"/v1/alerts/{a['id']}/redeliver")
    assert (r.status_code, r.json()) == (200, {"redelivered": 1})
    until(lambda: delivery(sc, "a")["state"] == "delivered", what="a delivered")
    assert delivery(sc, "b")["state"] == "undelivered" and undelivered_metric(sc, name) == 1
    listed = sc.client.get("/v1/alerts", params={"delivery": "undelivered"}).json()["alerts"]
    assert [x["run"] for x in listed] == ["b"]
    done = subprocess.run([sys.executable, "-m", "trainhealth", "redeliver", "--url", sc.url, "--target", name],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert (done.returncode, done.stdout) == (0, '/v1/alerts/redeliver: 200 {"redelivered":1}\n')
    until(lambda: delivery(sc, "b")["state"] == "delivered", what="b delivered")
    time.sleep(1.0)
    ok = [d.json()["run"] for d in receiver.deliveries()[2:]]
    assert ok == ["a", "b"] and undelivered_metric(sc, name) == 0  # each once
    assert sc.client.post(f"/v1/alerts/{a['id']}/redeliver").json() == {"redelivered": 0}
    assert sc.client.post("/v1/alerts/999/redeliver").status_code == 404
    r = sc.client.post("/v1/alerts/redeliver", params={"target": "nope"})
    assert r.status_code == 404 and name in r.json()["error"]


def test_a_500_is_retried_not_given_up(start_sidecar, receiver) -> None:
    sc = start_sidecar(config=f'[[webhooks]]\nurl = "{receiver.url}/hook"\nbackoff_initial = 0.1\nbackoff_max = 0.2\n')
    receiver.status = 500
    ingest(sc, nan_records("a", [0]))
    until(lambda: len(receiver.deliveries()) >= 3, what="retries")
    assert delivery(sc, "a")["state"] == "pending"
    receiver.status = 200
    until(lambda: delivery(sc, "a")["state"] == "delivered", what="delivered once the receiver is fixed")
    keys = {d.key for d in receiver.deliveries()}
    assert len(keys) == 1  # one notification, retried under one idempotency key


def test_a_hung_receiver_times_out_and_the_alert_is_delivered_under_one_key(start_sidecar, receiver) -> None:
    sc = start_sidecar(config=f'[[webhooks]]\nurl = "{receiver.url}/hook"\ntimeout = 0.3\nbackoff_initial = 0.1\n'
                              'backoff_max = 0.2\n')
    receiver.hold()  # answers nothing until released
    ingest(sc, nan_records("a", [0]))
    until(lambda: len(receiver.deliveries()) >= 2, what="a retry after the timeout")
    assert delivery(sc, "a")["state"] == "pending"
    receiver.release()
    until(lambda: delivery(sc, "a")["state"] == "delivered", what="delivered once the receiver answers")
    assert len({d.key for d in receiver.deliveries()}) == 1  # re-sends are the same notification
