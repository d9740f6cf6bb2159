"""Fault: errors counted, one warning a minute while failing, recovery logged; /healthz's answer."""

from __future__ import annotations

import logging

import pytest
from trainhealth.health import Fault, HealthCollector, healthz


class Clock:
    t = 0.0

    def __call__(self) -> float:
        return self.t


def test_a_failing_writer_warns_once_a_minute_with_the_count(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    fault = Fault("recorder", clock=clock)
    caplog.set_level(logging.WARNING, "trainhealth.health")
    for i in range(120):  # two a second for a minute
        clock.t = i / 2
        fault.failed("run.jsonl", OSError(27, "File too large"))
    clock.t = 60.0
    fault.failed("run.jsonl", OSError(27, "File too large"))
    fault.ok()
    assert [r.getMessage() for r in caplog.records] == [
        "recorder cannot write: run.jsonl: [Errno 27] File too large",
        "recorder cannot write: run.jsonl: [Errno 27] File too large (120 failures since the last warning)",
        "recorder writes again after 121 failures (last: run.jsonl: [Errno 27] File too large)",
    ]
    assert fault.errors == 121 and fault.failing is None


def test_healthz_is_503_naming_each_failing_writer_then_200() -> None:
    store, recorder = Fault("store"), Fault("recorder")
    assert healthz([store, recorder]) == (200, {"status": "ok"})
    store.failed("alert history", OSError("disk I/O error"))
    failing = {"store": "alert history: disk I/O error"}
    assert healthz([store, recorder]) == (503, {"status": "failing", "failing": failing})
    store.ok()
    assert healthz([store, recorder])[0] == 200


def test_error_counters_are_exported_even_without_a_recorder() -> None:
    store = Fault("store")
    store.failed("x", OSError("full"))
    samples = {s.name: s.value for fam in HealthCollector([store]).collect() for s in fam.samples}
    assert samples == {"trainhealth_store_errors_total": 1.0, "trainhealth_recorder_errors_total": 0.0,
                       "trainhealth_state_errors_total": 0.0}
