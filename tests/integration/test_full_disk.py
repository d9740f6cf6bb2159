"""A full disk under the real sidecar: alerts held and written later (never raised then lost), /healthz 503
with the reason and 200 after, error counters in /metrics, rate-limited warnings, no re-post loop when an
outbox delete fails, and no alert id given twice across a kill -9.

The disk fills for real as far as the sidecar can tell: the test sets the sidecar process's RLIMIT_FSIZE to
1 byte with prlimit(2) while it runs (every write to a regular file then fails with EFBIG, which SQLite
reports as "disk I/O error") and lifts it again, so the disk can be freed on cue; no root, no
mount. The receiver is a real HTTP server.
"""

from __future__ import annotations

import errno
import os
import resource
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from .alerting import ingest, nan_records, until
from .test_config_reload import StderrLines


def disk_full(pid: int, full: bool) -> None:
    _, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (1 if full else hard, hard))


def metric(sc: Any, name: str) -> float:
    for line in sc.client.get("/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def healthy(run: str, step: int) -> list[dict[str, Any]]:
    return [{"run": run, "rank": 0, "time": time.time(), "step": step, "loss": 2.0}]


def test_full_disk_holds_the_alert_answers_503_and_delivers_it_once_after(start_sidecar, receiver,
                                                                         tmp_path: Path) -> None:
    sc = start_sidecar("--webhook", f"{receiver.url}/hook", "--record", str(tmp_path / "rec"))
    log = StderrLines(sc)
    ingest(sc, healthy("steady", 1))
    assert sc.client.get("/healthz").status_code == 200

    disk_full(sc.proc.pid, True)
    assert ingest(sc, nan_records("full", [0]))["alerts"] == 1  # raised: it must not be lost
    for step in range(2, 22):  # a batch every 50 ms: the warnings must not follow each one
        assert ingest(sc, healthy("steady", step))["accepted"] == 1
        time.sleep(0.05)
    health = sc.client.get("/healthz")
    assert health.status_code == 503
    failing = health.json()["failing"]
    assert set(failing) == {"store", "recorder", "state"}  # state: the detectors' journal in the same db
    assert "disk" in failing["store"] and "File too large" in failing["recorder"]  # SQLite: "disk I/O error"
    assert metric(sc, "trainhealth_store_errors_total") >= 1
    assert metric(sc, "trainhealth_recorder_errors_total") >= 20
    time.sleep(1.5)
    assert receiver.deliveries() == []  # not in the outbox yet: held in memory
    assert sum("recorder cannot write" in ln for ln in log.lines) == 1  # one warning, not one per batch
    assert sum("store cannot write" in ln for ln in log.lines) == 1

    disk_full(sc.proc.pid, False)
    ingest(sc, healthy("steady", 30))  # the recorder learns with its next write
    until(lambda: sc.client.get("/healthz").status_code == 200, what="/healthz 200 after the disk is freed")
    receiver.wait_for(lambda: len(receiver.deliveries()) == 1, what="the held alert, delivered")
    alerts = sc.client.get("/v1/alerts", params={"run": "full"}).json()["alerts"]
    assert [(a["alert"], a["state"]) for a in alerts] == [("nan_divergence", "firing")]
    assert receiver.deliveries()[0].json()["id"] == alerts[0]["id"]
    until(lambda: sc.client.get("/v1/alerts", params={"run": "full"}).json()["alerts"][0]["delivery"][0]["state"]
          == "delivered", what="delivery state 'delivered'")
    time.sleep(1.5)
    assert len(receiver.deliveries()) == 1
    assert any("store writes again" in ln for ln in log.lines)


def test_a_delivered_row_whose_delete_fails_is_not_posted_again(start_sidecar, receiver) -> None:
    sc = start_sidecar("--webhook", f"{receiver.url}/hook")
    receiver.hold()
    ingest(sc, nan_records("r1", [0]))
    receiver.wait_for(lambda: receiver.in_flight == 1, what="the delivery in flight")
    disk_full(sc.proc.pid, True)
    receiver.release()  # answers 200; the sidecar cannot delete the outbox row
    until(lambda: sc.client.get("/healthz").status_code == 503, what="/healthz 503 after the failed delete")
    time.sleep(3.0)  # the old loop re-posted every second
    assert len(receiver.deliveries()) == 1
    disk_full(sc.proc.pid, False)
    until(lambda: sc.client.get("/healthz").status_code == 200, what="/healthz 200 after the disk is freed")
    time.sleep(1.5)
    assert len(receiver.deliveries()) == 1
    assert sc.client.get("/v1/alerts").json()["alerts"][0]["delivery"][0]["state"] == "delivered"


def test_an_id_given_while_the_disk_was_full_is_not_given_again_after_a_kill(start_sidecar, tmp_path: Path
                                                                           ) -> None:
    db = str(tmp_path / "kept.db")
    sc = start_sidecar("--db", db, db=False)
    ingest(sc, nan_records("stored", [0]))
    disk_full(sc.proc.pid, True)
    ingest(sc, nan_records("held", [0]))
    held = sc.client.get("/v1/runs/held").json()["firing"][0]["id"]
    sc.stop(kill=True)  # kill -9 while the alert is only in memory: it is lost, its id must not be reused

    sc = start_sidecar("--db", db, db=False)
    ingest(sc, nan_records("after", [0]))
    ids = {a["run"]: a["id"] for a in sc.client.get("/v1/alerts").json()["alerts"]}
    assert set(ids) == {"stored", "after"} and ids["after"] > held > ids["stored"]


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A real 24 MiB filesystem (tmpfs) that can fill up: ENOSPC, not a file size limit. Needs root."""
    mount = tmp_path / f"fs-hostile-{os.getpid()}"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "trainhealth-test-fs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> Path:
    """Write until the filesystem is full."""
    filler = directory / "filler"
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * (64 << 10))
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


def test_a_clean_stop_on_a_full_disk_keeps_the_alerts_it_held(start_sidecar, receiver, small_filesystem: Path
                                                              ) -> None:
    db = str(small_filesystem / "trainhealth.db")
    sc = start_sidecar("--db", db, "--webhook", f"{receiver.url}/hook", db=False)
    ingest(sc, healthy("steady", 1))
    assert os.path.getsize(db + ".reserve") == 16 << 20
    filler = fill(small_filesystem)
    assert ingest(sc, nan_records("full", [0, 1]))["alerts"] == 1  # raised while nothing can be written
    until(lambda: sc.client.get("/healthz").status_code == 503, what="/healthz 503 on the full disk")
    sc.stop()  # SIGTERM: a clean stop
    assert "could not be written before shutdown" not in sc.stderr_text(), sc.stderr_text()
    assert not os.path.exists(db + ".reserve")
    filler.unlink()  # space again
    again = start_sidecar("--db", db, "--webhook", f"{receiver.url}/hook", db=False)
    alerts = again.client.get("/v1/alerts", params={"run": "full"}).json()["alerts"]
    assert [(a["alert"], a["state"]) for a in alerts] == [("nan_divergence", "firing")]
    receiver.wait_for(lambda: len(receiver.deliveries()) == 1, what="the alert held at the stop, delivered")
    assert receiver.deliveries()[0].json()["id"] == alerts[0]["id"]
    assert again.client.get("/v1/runs/full").json()["firing"][0]["alert"] == "nan_divergence"  # the state too
