"""What the sidecar knows about its own writes: is the store (or the flight recorder) failing right now, why,
and how often it failed. ``/healthz`` answers 503 with the reasons while one is failing, ``/metrics`` counts
the errors (``trainhealth_store_errors_total``, ``trainhealth_recorder_errors_total``), and the log gets the
first failure, a reminder at most once per ``log_every`` seconds (with the count), and the recovery: a full
disk under a batch a second must not write a warning a second.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

log = logging.getLogger(__name__)

WRITE_ERROR_NAMES = ("trainhealth_store_errors_total", "trainhealth_recorder_errors_total",
                     "trainhealth_state_errors_total")  # always exported
UNDELIVERED_NAMES = ("trainhealth_webhook_undelivered",)  # samples only with a delivery target


@dataclass
class Fault:
    """One component's write health. ``failed`` on every error, ``ok`` on every success."""

    name: str  # "store", "recorder": the metric is trainhealth_<name>_errors_total
    clock: Callable[[], float] = time.monotonic
    log_every: float = 60.0
    errors: int = 0
    failing: str | None = None  # the last error while failing; None when the last write worked
    _logged_at: float = field(default=-1e18, repr=False)
    _since_log: int = field(default=0, repr=False)

    def failed(self, what: str, exc: BaseException) -> None:
        self.errors += 1
        self._since_log += 1
        first = self.failing is None
        self.failing = f"{what}: {exc}"
        now = self.clock()
        if first or now - self._logged_at >= self.log_every:
            more = "" if first else f" ({self._since_log} failures since the last warning)"
            log.warning("%s cannot write: %s%s", self.name, self.failing, more)
            self._logged_at, self._since_log = now, 0

    def ok(self) -> None:
        if self.failing is not None:
            log.warning("%s writes again after %d failures (last: %s)", self.name, self.errors, self.failing)
            self.failing = None
            self._since_log = 0


def healthz(faults: list[Fault]) -> tuple[int, dict[str, object]]:
    """(status, body) for /healthz: 503 naming each failing component, else 200."""
    failing = {f.name: f.failing for f in faults if f.failing is not None}
    if failing:
        return 503, {"status": "failing", "failing": failing}
    return 200, {"status": "ok"}


class HealthCollector:
    """Prometheus: ``trainhealth_store_errors_total``, ``trainhealth_recorder_errors_total`` (always exported,
    0 without a recorder) and ``trainhealth_webhook_undelivered{target}`` (notifications kept undelivered
    until redelivered) from the delivery stats of any source that has them. Reads in-memory counters only."""

    NAMES = ("store", "recorder", "state")  # state: the detectors' snapshot and journal (checkpoint.py)

    def __init__(self, faults: Sequence[Fault], sources: Sequence[object] = ()) -> None:
        self.faults = faults
        self.sources = sources

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        errors = dict.fromkeys(self.NAMES, 0)
        for f in self.faults:
            errors[f.name] = errors.get(f.name, 0) + f.errors
        for name, n in errors.items():
            yield CounterMetricFamily(f"trainhealth_{name}_errors", f"Writes the {name} could not make "
                                      "(a full disk, an I/O error).", value=n)
        undelivered = GaugeMetricFamily("trainhealth_webhook_undelivered",
                                        "Notifications given up on (a 4xx, or retried past give_up_after) and "
                                        "kept for redelivery, per target.", labels=["target"])
        for source in self.sources:
            stats = getattr(source, "delivery_stats", None)
            if stats is None:
                continue
            for t in stats().get("targets", ()):
                undelivered.add_metric([t["name"]], t.get("undelivered", 0))
        yield undelivered
