"""Push to a real Alertmanager (Debian's prometheus-alertmanager, started here with clustering off)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest
from trainhealth.notify.alertmanager import rfc3339

from tests.conftest import need_binary
from tests.integration.alerting import config, free_port, ingest, nan_records

pytestmark = pytest.mark.integration

AM_CONFIG = """
route:
  receiver: blackhole
  group_wait: 1s
receivers:
  - name: blackhole
"""


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[str]:
    binary = need_binary("prometheus-alertmanager")
    (tmp_path / "am.yml").write_text(AM_CONFIG)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "am.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'am.yml'}", f"--storage.path={tmp_path / 'am-data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: _ready(url), 30, "alertmanager ready")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def am_alerts(url: str, run: str) -> list[dict[str, Any]]:
    resp = httpx.get(f"{url}/api/v2/alerts", params={"filter": f'run="{run}"'}, timeout=5)
    resp.raise_for_status()
    return list(resp.json())


def test_alert_shows_up_in_alertmanager_with_its_labels_and_resolves(start_sidecar, alertmanager,
                                                                     tmp_path: Path) -> None:
    sidecar = start_sidecar("--config", config(tmp_path, "[limits]\nrun_ttl_seconds = 2\n"),
                            "--alertmanager", alertmanager)
    ingest(sidecar, nan_records("am-run", [2]))
    (alert,) = wait_until(lambda: am_alerts(alertmanager, "am-run"), 10, "the alert in Alertmanager")
    assert alert["labels"] == {"alertname": "nan_divergence", "run": "am-run",  # one per run: no rank
                               "severity": "critical", "source": "trainhealth"}
    assert alert["annotations"]["summary"].startswith("loss became nan at step 10 on rank 2")
    assert alert["status"]["state"] == "active"
    assert alert["endsAt"] > rfc3339(time.time() + 200)  # 4 x 60 s: only our resolve can end it soon

    # the run sends nothing more: it expires after 2 s, and the resolve (endsAt now) reaches Alertmanager
    wait_until(lambda: not am_alerts(alertmanager, "am-run"), 10, "the alert resolved in Alertmanager")
    states = [a["state"] for a in sidecar.client.get("/v1/alerts", params={"run": "am-run"}).json()["alerts"]]
    assert states == ["resolved", "firing"]


def test_firing_alert_is_re_sent_so_alertmanager_keeps_it(start_sidecar, alertmanager,
                                                          tmp_path: Path) -> None:
    sidecar = start_sidecar("--config", config(tmp_path, "[alertmanager]\nresend_seconds = 0.5\n"),
                            "--alertmanager", alertmanager)
    ingest(sidecar, nan_records("long", [0]))
    (first,) = wait_until(lambda: am_alerts(alertmanager, "long"), 10, "the alert in Alertmanager")
    time.sleep(2.5)  # longer than the 4 x 0.5 s endsAt of one push
    (later,) = am_alerts(alertmanager, "long")
    assert later["status"]["state"] == "active"
    assert later["endsAt"] > first["endsAt"] and later["startsAt"] == first["startsAt"]
