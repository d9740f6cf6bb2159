"""A stop every rank takes, or none (monitor/stop_steps.py, trainer/hearing.py): the real sidecar and two real
clients (Telemetry with its threads, the ingest answers and the long poll over HTTP), whose training threads
step together as torchrun ranks do (a barrier per step stands for the step's all-reduce). Rank 1 hears the
stop step only after its loop has checked it: the partial miss that used to strand it in the next step's
collective while rank 0 left the loop."""

from __future__ import annotations

import math
import threading
import time

import pytest
from trainhealth.trainer.client import Telemetry

from tests.late_hearing import hold_the_first_stop_until_checked

pytestmark = pytest.mark.integration

NAN_STEP = 10
STEP_SECONDS = 0.02  # the ranks' compute per step (the sidecar's lead: 0.1 s, so 5 steps)


def test_a_rank_that_hears_the_stop_after_checking_it_is_not_left_alone_both_stop_later_together(sidecar):
    run = "stop-confirm"
    clients = [Telemetry(url=sidecar.url, run=run, rank=r, world_size=2, environ={}, probes=[],
                         stop_on={"nan_divergence"}, flush_seconds=0.2, heartbeat_seconds=60.0) for r in (0, 1)]
    held = hold_the_first_stop_until_checked(clients[1])
    allreduce = threading.Barrier(2, timeout=60)  # a rank left alone here is the deadlock: it breaks the test
    stopped: dict[int, int] = {}
    errors: list[BaseException] = []

    def train(tm: Telemetry) -> None:
        try:
            tm.start()
            for step in range(1, 200):
                allreduce.wait()
                threading.Event().wait(STEP_SECONDS)  # the step's compute
                tm.record(step, loss=math.nan if (tm.rank, step) == (1, NAN_STEP) else 1.0)
                if tm.rank == 0 and step == NAN_STEP + 1:  # rank 0 hears the stop in time (rank 1: one step ahead)
                    deadline = time.monotonic() + 60
                    while tm._hearing.stop_at is None and time.monotonic() < deadline:
                        threading.Event().wait(0.002)
                if tm.should_stop(step):
                    stopped[tm.rank] = step
                    return
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
            allreduce.abort()

    threads = [threading.Thread(target=train, args=(tm,), daemon=True) for tm in clients]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors and not any(t.is_alive() for t in threads), errors
        first = held[0]
        assert NAN_STEP < first
        assert stopped[0] == stopped[1] > first  # not at the stop rank 1 missed: together, at a later one
        view = sidecar.client.get(f"/v1/runs/{run}/watch", params={"version": 0, "timeout": 0}).json()
        stop = view["stops"]["nan_divergence"]
        assert (stop["step"], stop["confirmed"]) == (stopped[0], True) and stop["moved"] >= 1
    finally:
        allreduce.abort()
        for tm in clients:
            tm.end()
            tm.close()
