"""scripts/demo_alerts.py, the demo's alert feed, against a real sidecar: every transition once, oldest first,
"run" for a run-level alert, and it ends once the job is over and nothing new came."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT
from tests.page_traces import leaking_run, lines

pytestmark = pytest.mark.integration


def test_the_feed_prints_each_alert_once_in_order_with_run_for_run_level_ones(start_sidecar, tmp_path) -> None:
    sidecar = start_sidecar()
    records = leaking_run()  # rank 0 leaks; its LR off the rule (a run-level alert at the start)
    for r in records:
        if r.get("type") == "start":
            r.update(reference_lr=3e-4, reference_batch_size=4)
    answer = sidecar.client.post("/v1/ingest", content=lines(records), headers={"Content-Type": "application/x-ndjson"})
    assert answer.status_code == 200, answer.text
    done = tmp_path / "job-done"
    done.touch()  # the job is over: the feed prints what there is and ends after 2 quiet seconds
    feed = subprocess.run([sys.executable, "scripts/demo_alerts.py", sidecar.url, "leak", "--until-file", str(done),
                           "--quiet", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert feed.returncode == 0, feed.stderr
    rows = [line.split() for line in feed.stdout.splitlines()]
    shown = [(r[2], r[4], r[6] if r[6] == "run" else f"{r[6]} {r[7]}") for r in rows]
    assert shown == [("0", "lr_scaling", "run"), ("38", "host_memory_leak", "run")]  # one incident per limit
    assert "rank=None" not in feed.stdout


def test_the_feed_waits_its_quiet_seconds_after_the_job_ends_for_a_late_alert(start_sidecar, tmp_path) -> None:
    # A rank that died without a word is named seconds after the job is over: the feed's quiet time counts from
    # the job's end, not from its last alert (before, a job with no alert for a while ended the feed at once).
    sidecar = start_sidecar()
    records = leaking_run()
    for r in records:
        if r.get("type") == "start":
            r.update(reference_lr=3e-4, reference_batch_size=4)
    starts = [r for r in records if r.get("type") == "start"]
    assert sidecar.client.post("/v1/ingest", content=lines(starts),
                               headers={"Content-Type": "application/x-ndjson"}).status_code == 200
    done, quiet = tmp_path / "job-done", 1.5
    feed = subprocess.Popen([sys.executable, "scripts/demo_alerts.py", sidecar.url, "leak", "--until-file", str(done),
                             "--quiet", str(quiet)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    with feed:
        try:
            assert feed.stdout is not None and "lr_scaling" in feed.stdout.readline()  # it is polling
            time.sleep(quiet + 0.5)  # the job runs on with no new alert for longer than the quiet time
            ended = time.monotonic()
            done.touch()
            assert feed.wait(timeout=60) == 0
            assert time.monotonic() - ended >= quiet
        finally:
            feed.kill()
