"""A client that hears the first stop step only after its loop has checked that step: the partial miss of the
stop protocol (trainer/hearing.py, monitor/stop_steps.py), made to happen on purpose. Used by
tests/integration/test_stop_confirmation.py and, under torchrun, by tests/e2e/loop_worker.py ``--miss-rank``."""

from __future__ import annotations

import threading
import time
from typing import Any

from trainhealth.trainer.client import Telemetry


def hold_the_first_stop_until_checked(tm: Telemetry, ceiling: float = 60.0) -> list[int]:
    """Every view naming the first stop step the client is told is handed to its hearing only once the loop has
    checked that step (whichever client thread brings it: an ingest answer or the long poll); later stops pass.
    Returns the list that gets that first step."""
    hearing = tm._hearing
    take = hearing.view
    held: list[int] = []

    def delayed(view: dict[str, Any]) -> None:
        stops = view.get("stops")
        stop = next((s for s in stops.values() if isinstance(s, dict)), None) if isinstance(stops, dict) else None
        if stop is not None and (not held or held[0] == stop["step"]):
            held[:1] = [stop["step"]]
            deadline = time.monotonic() + ceiling
            while (hearing.checked or -1) < stop["step"] and time.monotonic() < deadline:
                threading.Event().wait(0.002)  # poll the training thread's progress (a condition, bounded)
        take(view)

    hearing.view = delayed  # type: ignore[method-assign]
    return held
