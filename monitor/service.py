"""The sidecar as one object: ingest -> pipeline -> alert sinks, plus the timer and reload.

No HTTP here (api.py adapts it) and no globals: the clock and the sinks are
passed in, so tests build it directly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Coroutine, Protocol, Sequence

from . import batches
from . import config as config_mod
from .alerts import Alert
from .config import Settings
from .ingest import BodyError, Decoded, Rejection, decode_body
from .pipeline import Pipeline
from .record import Record
from .recorder import FlightRecorder
from .watch import Watch

log = logging.getLogger(__name__)

MAX_REASONS = 100  # rejections listed in one answer; the count is always exact


class AlertSink(Protocol):
    """Anything that takes alert transitions (store, webhooks, Alertmanager)."""

    def __call__(self, alerts: list[Alert]) -> None: ...


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
        self.pipeline = Pipeline(settings.detectors, settings.limits, settings.server.tick_seconds)
        self.book = self.pipeline.book
        self.sinks: list[AlertSink] = list(sinks or [])
        # Components wired in by server.py: accepted records (one call per batch), jobs run in the
        # app's lifespan (cancelled at shutdown), cleanups for close(), and the alert history reader.
        self.record_sinks: list[Callable[[Sequence[Record]], None]] = []
        self.background: list[Callable[[], Coroutine[Any, Any, None]]] = []
        self.closers: list[Callable[[], None]] = []
        self.query_alerts: Callable[..., dict[str, Any]] | None = None
        self.stats = IngestStats()
        self.watch = Watch(self.book, self.pipeline.runs)  # what the runs' clients hear: alerts, stop steps
        self.taken = batches.TakenBatches()  # client batch ids already ingested (resends are skipped)
        if settings.server.record_dir:  # the flight recorder: the first record sink
            recorder = FlightRecorder(settings.server.record_dir, settings.server.record_max_bytes)
            self.record_sinks.append(recorder.write)
            self.closers.append(recorder.close)

    # -- ingest -------------------------------------------------------------
    def ingest(self, body: bytes, content_type: str | None = None,
               content_encoding: str | None = None, batch_id: str | None = None,
               views: bool = False) -> IngestAnswer:
        """``batch_id``: the client's ``X-Trainhealth-Batch`` (CLIENT/SEQ); a batch already taken is
        answered ``duplicate`` and not ingested again (batches.py). ``views``: the answer also carries
        ``runs``, the view of each run of the batch that has alerts (watch.py), for the client."""
        limits = self.settings.limits
        ident = None
        if batch_id is not None:
            try:
                ident = batches.parse(batch_id)
            except batches.BatchIdError as exc:
                return self.refuse(400, str(exc))
            if self.taken.taken(*ident):
                return IngestAnswer(200, {"accepted": 0, "rejected": 0, "alerts": 0, "duplicate": True})
        try:
            decoded = decode_body(body, content_type, content_encoding,
                                  max_records=limits.max_records_per_batch,
                                  max_decoded_bytes=limits.max_decoded_bytes)
        except BodyError as exc:
            return self.refuse(exc.status, str(exc))
        answer = self.accept(decoded, views)
        if ident is not None and answer.status == 200:
            self.taken.take(*ident)
        return answer

    def refuse(self, status: int, message: str) -> IngestAnswer:
        self.stats.bodies_refused[status] = self.stats.bodies_refused.get(status, 0) + 1
        return IngestAnswer(status, {"error": message})

    def accept(self, decoded: Decoded, views: bool = False) -> IngestAnswer:
        self.stats.batches += 1
        wall = self.clock()
        self._refuse_future(decoded, wall)
        outcome = self.pipeline.process(decoded.records, wall=wall)
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
        names = self.watch.note(kept)
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
        if views:  # the job hears its alerts: firing ones and agreed stop steps (watch.py)
            shown = self.watch.views(names)
            if shown:
                body["runs"] = shown
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
        self.watch.on_alerts(alerts)
        for sink in self.sinks:
            try:
                sink(alerts)
            except Exception:  # an optional sink must never break ingest
                log.exception("alert sink %r failed", sink)

    # -- time and config ----------------------------------------------------
    def tick(self) -> list[Alert]:
        alerts = self.pipeline.tick_wall(self.clock())
        self.dispatch(alerts)
        return alerts

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
