"""The sidecar as one object: ingest -> pipeline -> alert sinks, plus the timer and reload.

No HTTP here (api.py adapts it) and no globals: the clock and the sinks are
passed in, so tests build it directly.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Coroutine, Protocol, Sequence

from . import config as config_mod
from .alerts import Alert
from .config import Settings
from .ingest import BodyError, Decoded, Rejection, decode_body
from .pauses import Watch
from .pipeline import Pipeline
from .record import Record
from .recorder import FlightRecorder

log = logging.getLogger(__name__)

MAX_REASONS = 100  # rejections listed in one answer; the count is always exact


class AlertSink(Protocol):
    """Anything that takes alert transitions (store, webhooks, Alertmanager)."""

    def __call__(self, alerts: list[Alert]) -> None: ...


class Journal(Protocol):
    """What the pipeline was fed, in order, so a restart can rebuild its state (checkpoint.py)."""

    def fed(self, records: Sequence[Record], wall: float, judge_after: float) -> None: ...

    def ticked(self, wall: float, judge_after: float) -> None: ...


@dataclass(slots=True)
class IngestStats:
    batches: int = 0
    accepted: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # reason class -> count
    bodies_refused: dict[int, int] = field(default_factory=dict)  # HTTP status -> count
    alerts_raised: int = 0

    def reject(self, why: str, n: int = 1) -> None:
        self.rejected[why] = self.rejected.get(why, 0) + n


@dataclass(slots=True)
class IngestAnswer:
    status: int
    body: dict[str, Any]


class Service:
    def __init__(self, settings: Settings, *, config_file: str | None = None,
                 clock: Callable[[], float] = time.time,
                 sinks: list[AlertSink] | None = None) -> None:
        self.settings = settings
        self.config_file = config_file
        self.clock = clock
        # the pipeline's wall time: without the sidecar's own pauses (pauses.py); a test's clock is used as is
        self.watch = Watch() if clock is time.time else Watch(clock, clock, pause_seconds=math.inf)
        self.pipeline = Pipeline(settings.detectors, settings.limits, settings.server.tick_seconds)
        self.book = self.pipeline.book
        self.sinks: list[AlertSink] = list(sinks or [])
        # Components wired in by server.py: accepted records (one call per batch), jobs run in the
        # app's lifespan (cancelled at shutdown), cleanups for close(), and the alert history reader.
        self.record_sinks: list[Callable[[Sequence[Record]], None]] = []
        self.background: list[Callable[[], Coroutine[Any, Any, None]]] = []
        self.closers: list[Callable[[], None]] = []
        self.query_alerts: Callable[..., dict[str, Any]] | None = None
        self.journal: Journal | None = None
        self.background.append(self.watch.run)
        self.stats = IngestStats()
        if settings.server.record_dir:  # the flight recorder: the first record sink
            recorder = FlightRecorder(settings.server.record_dir, settings.server.record_max_bytes)
            self.record_sinks.append(recorder.write)
            self.closers.append(recorder.close)

    # -- ingest -------------------------------------------------------------
    def ingest(self, body: bytes, content_type: str | None = None,
               content_encoding: str | None = None) -> IngestAnswer:
        limits = self.settings.limits
        try:
            decoded = decode_body(body, content_type, content_encoding,
                                  max_records=limits.max_records_per_batch,
                                  max_decoded_bytes=limits.max_decoded_bytes)
        except BodyError as exc:
            return self.refuse(exc.status, str(exc))
        return self.accept(decoded)

    def refuse(self, status: int, message: str) -> IngestAnswer:
        self.stats.bodies_refused[status] = self.stats.bodies_refused.get(status, 0) + 1
        return IngestAnswer(status, {"error": message})

    def accept(self, decoded: Decoded) -> IngestAnswer:
        self.stats.batches += 1
        self._refuse_future(decoded, self.clock())
        wall = self._watch()
        outcome = self.pipeline.process(decoded.records, wall=wall)
        if self.journal is not None:
            self.journal.fed(decoded.records, wall, self.pipeline.judge_after)
        rejected = list(decoded.rejected)
        capped = 0
        if outcome.refused:
            refused_idx = {i for i, _ in outcome.refused}
            for i, exc in outcome.refused:
                rejected.append(Rejection(decoded.indexes[i], exc.field, exc.reason))
            capped = len(outcome.refused)
            kept = [r for i, r in enumerate(decoded.records) if i not in refused_idx]
            rejected.sort(key=lambda r: r.index)
        else:
            kept = decoded.records
        if kept:
            for record_sink in self.record_sinks:
                try:
                    record_sink(kept)
                except Exception:  # like alert sinks: never break ingest
                    log.exception("record sink %r failed", record_sink)
        self.stats.accepted += len(kept)
        if decoded.rejected:
            self.stats.reject("invalid", len(decoded.rejected))
        if capped:
            self.stats.reject("capped", capped)
        self.dispatch(outcome.alerts)
        status = 200
        if not kept and rejected:
            status = 429 if capped == len(rejected) else 400
        body: dict[str, Any] = {
            "accepted": len(kept),
            "rejected": len(rejected),
            "alerts": len(outcome.alerts),
        }
        if rejected:
            body["errors"] = [r.as_dict() for r in rejected[:MAX_REASONS]]
            if len(rejected) > MAX_REASONS:
                body["errors_truncated"] = len(rejected) - MAX_REASONS
        return IngestAnswer(status, body)

    def _refuse_future(self, decoded: Decoded, wall: float) -> None:
        """A record from the future would move its run's clock ahead for good (liveness, expiry)."""
        horizon = wall + self.settings.limits.max_future_seconds
        if all(r.time <= horizon for r in decoded.records):
            return
        records, indexes = [], []
        for rec, index in zip(decoded.records, decoded.indexes):
            if rec.time <= horizon:
                records.append(rec)
                indexes.append(index)
            else:
                decoded.rejected.append(Rejection(
                    index, "time", f"{rec.time!r} is {rec.time - wall:.0f} s ahead of this sidecar's clock "
                                   "(limits.max_future_seconds): check the sending host's clock"))
        decoded.records, decoded.indexes = records, indexes
        decoded.rejected.sort(key=lambda r: r.index)

    # -- alerts out ---------------------------------------------------------
    def dispatch(self, alerts: list[Alert]) -> None:
        if not alerts:
            return
        self.stats.alerts_raised += sum(1 for a in alerts if a["state"] == "firing")
        for sink in self.sinks:
            try:
                sink(alerts)
            except Exception:  # an optional sink must never break ingest
                log.exception("alert sink %r failed", sink)

    # -- time and config ----------------------------------------------------
    def tick(self) -> list[Alert]:
        wall = self._watch()
        watched = bool(self.pipeline.runs)
        alerts = self.pipeline.tick_wall(wall)
        if self.journal is not None and watched:
            self.journal.ticked(wall, self.pipeline.judge_after)
        self.dispatch(alerts)
        return alerts

    def _watch(self) -> float:
        """The pipeline's wall time, and whether verdicts wait (the sidecar catching up after a pause)."""
        wall = self.watch.now()
        self.pipeline.judge_after = self.watch.hold_until
        return wall

    def reload(self) -> dict[str, Any]:
        """Re-read detector thresholds from the config file, keeping all state."""
        try:
            settings = config_mod.reload_detectors(self.config_file)
        except ValueError as exc:
            log.error("config reload failed, keeping the old thresholds: %s", exc)
            return {"reloaded": False, "error": str(exc)}
        self.pipeline.reconfigure(settings)
        self.settings.detectors = settings
        log.info("config reloaded from %s", self.config_file)
        return {"reloaded": True, "config": self.config_file}

    def close(self) -> None:
        for closer in self.closers:
            closer()
