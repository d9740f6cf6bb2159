"""scripts/demo_alerts.py, the demo's alert feed, against a real sidecar: every transition once, oldest first,
"run" for a run-level alert, and it ends once the job is over and nothing new came."""

from __future__ import annotations

import subprocess
import sys

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
    feed = subprocess.run([sys.executable, "scripts/demo_alerts.py", sidecar.url, "leak", "--until-file", str(done)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert feed.returncode == 0, feed.stderr
    rows = [line.split() for line in feed.stdout.splitlines()]
    shown = [(r[2], r[4], r[6] if r[6] == "run" else f"{r[6]} {r[7]}") for r in rows]
    assert shown == [("0", "lr_scaling", "run"), ("38", "host_memory_leak", "run")]  # one incident per limit
    assert "rank=None" not in feed.stdout
