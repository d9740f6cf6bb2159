"""The sidecar's console: one line per alert transition (monitor/notify/console.py)."""

from __future__ import annotations

import logging

from trainhealth.notify.console import line, log_alerts


def alert(**over):
    return {"alert": "nan_divergence", "state": "firing", "severity": "critical", "run": "demo", "rank": 1,
            "step": 812, "summary": "loss became NaN at step 812\non rank 1;  LR 0.02", **over}


def test_one_line_with_severity_alert_run_rank_step_and_summary():
    assert line(alert()) == ("ALERT firing critical nan_divergence run=demo rank=1 step=812: "
                             "loss became NaN at step 812 on rank 1; LR 0.02")
    assert line(alert(rank=None, alert="lr_scaling")).startswith("ALERT firing critical lr_scaling run=demo rank=- ")


def test_pages_log_at_warning_the_rest_at_info(caplog):
    caplog.set_level(logging.INFO, "trainhealth.alerts")
    log_alerts([alert(), alert(state="resolved", severity="critical"), alert(severity="warning", alert="straggler")])
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.INFO, logging.INFO]
    assert all("\n" not in r.getMessage() for r in caplog.records)
