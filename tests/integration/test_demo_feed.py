"""scripts/demo_alerts.py, the demo's alert feed, against a real sidecar: every transition once, oldest first,
"run" for a run-level alert, and it ends once the job is over and nothing new came."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.page_traces import RUN, diverging_run, lines

pytestmark = pytest.mark.integration


def test_the_feed_prints_each_alert_once_in_order_with_run_for_run_level_ones(start_sidecar, tmp_path) -> None:
    sidecar = start_sidecar()
    answer = sidecar.client.post("/v1/ingest", content=lines(diverging_run(steps=200, nan_step=150)),
                                 headers={"Content-Type": "application/x-ndjson"})
    assert answer.status_code == 200, answer.text
    done = tmp_path / "job-done"
    done.touch()  # the job is over: the feed prints what there is and ends after 2 quiet seconds
    feed = subprocess.run([sys.executable, "scripts/demo_alerts.py", sidecar.url, RUN, "--until-file", str(done)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert feed.returncode == 0, feed.stderr
    rows = [line.split() for line in feed.stdout.splitlines()]
    shown = [(r[2], r[4], r[6] if r[6] == "run" else f"{r[6]} {r[7]}") for r in rows]
    assert shown == [("0", "lr_scaling", "run"), ("146", "loss_spike", "rank 0"), ("146", "loss_spike", "rank 1"),
                     ("150", "nan_divergence", "run")]
    assert "rank=None" not in feed.stdout
