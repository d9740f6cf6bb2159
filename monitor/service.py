"""The sidecar as one object: ingest -> pipeline -> alert sinks, plus the timer and reload.

No HTTP here (http/app.py adapts it) and no globals: the clock, the sinks and
the jobs are passed to the constructor (assembly.py assembles them for the
server), so tests build it directly.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, Callable, Coroutine, Iterable, Protocol, Sequence

from . import batches, launches
from .alerts import Alert, AlertBook, copied
from .config import ConfigError, Settings
from .events import firing, resolved
from .health import Fault, healthz
from .ingest import BodyError, Decoded, Decoder, Rejection
from .pipeline import Pipeline, run_last_step
from .record import Record
from .sidecar_clock import SidecarClock
from .stop_steps import StopLead, StopSteps

log = logging.getLogger(__name__)

LIVE_SERVER_KEYS = ("webhooks", "alertmanager")  # delivery targets: applied by a reload, like [[webhooks]]
MAX_REASONS = 100  # rejections listed in one answer; the count is always exact
_time, _run, _index = attrgetter("time"), attrgetter("run"), attrgetter("index")


class AlertSink(Protocol):
    """Anything that takes alerts from the book (the console; the store, webhooks and Alertmanager). Every
    call gets the sink its own copies (``dispatch``): it may keep or change them; the book's stay the book's."""

    def __call__(self, alerts: list[Alert]) -> None:
        """Transitions (firing, resolved), in the order they were made; each carries its ``id`` where the
        book was given an id sequence (the server: the store's)."""

    def refresh(self, alerts: list[Alert]) -> None:
        """Open alerts the book rewrote in place (one incident whose picture sharpened: same id, same episode,
        nobody paged again), as they stand now; before the transitions of the same batch."""


class RecordWriter(Protocol):
    """Takes each batch of accepted records (the flight recorder, the store's runs and starts)."""

    def __call__(self, records: Sequence[Record], texts: Sequence[bytes] | None) -> None:
        """``texts``: each record's JSON text as the body held it, one line that decodes back to the record
        (``Decoded.texts``), where the Service keeps them (``keep_texts``); None otherwise."""


class Journal(Protocol):
    """What the pipeline was fed, in order, so a restart can rebuild its state (checkpoint.py)."""

    def fed(self, records: Sequence[Record], wall: float, judge_after: float,
            texts: Sequence[bytes] | None = None) -> None:
        """``texts``: each record's JSON text, as the record writers get them (``RecordWriter``), or None."""

    def ticked(self, wall: float, judge_after: float) -> None: ...


def pause_watch(clock: Callable[[], float]) -> SidecarClock:
    """The pipeline's wall time: without the sidecar's own pauses (sidecar_clock.py); a test's clock is used as is."""
    return SidecarClock() if clock is time.time else SidecarClock(clock, clock, pause_seconds=math.inf)


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
    """One sidecar. Collaborators, all optional, all given here (one way to build it):

    - ``alert_sinks``: take alert transitions (the store and delivery: notify/sink.py);
    - ``record_writers``: take each batch of accepted records (the flight recorder, the store's runs);
    - ``keep_texts``: the decoder keeps each record's JSON text for the record writers (the flight recorder
      writes it as it came: ingest.Decoder);
    - ``background``: jobs run in the app's lifespan (deliveries), cancelled at shutdown;
    - ``closers``: cleanups for ``close()``;
    - ``query_alerts``: the alert history reader (the store); without it, the in-memory book answers;
    - ``faults``: components whose writes can fail (store, recorder): ``/healthz`` is 503 while one does;
    - ``load_settings``: re-reads every setting (file, environment, flags) for a reload;
    - ``reloaders``: told the new settings after a reload passed (delivery targets);
    - ``pipeline`` and ``pauses``: the pipeline and the sidecar's clock, when they were restored before
      (assembly.py: the store's open alerts and the journal put back into them); built here from
      ``settings`` and ``clock`` otherwise;
    - ``journal``: told every batch and tick the pipeline is fed, for a restart (checkpoint.py);
    - ``alert_ids``: the sequence a pipeline built here assigns transition ids from (assembly.py gives its
      pipeline's book the store's); None: no ids.
    """

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.time,
                 alert_sinks: Sequence[AlertSink] = (),
                 record_writers: Sequence[RecordWriter] = (), keep_texts: bool = False,
                 background: Sequence[Callable[[], Coroutine[Any, Any, None]]] = (),
                 closers: Sequence[Callable[[], None]] = (),
                 query_alerts: Callable[..., dict[str, Any]] | None = None,
                 faults: Sequence[Fault] = (),
                 load_settings: Callable[[], Settings] | None = None,
                 reloaders: Sequence[Callable[[Settings], None]] = (),
                 pipeline: Pipeline | None = None, pauses: SidecarClock | None = None,
                 journal: Journal | None = None, alert_ids: Callable[[], int] | None = None) -> None:
        self.settings = settings
        self.clock = clock
        self.sidecar_clock = pauses if pauses is not None else pause_watch(clock)
        self.pipeline = pipeline if pipeline is not None else Pipeline(
            settings.detectors, settings.limits, settings.server.tick_seconds, book=AlertBook(ids=alert_ids))
        self.book = self.pipeline.book  # the one owner of open alerts and their ids (alerts.py)
        self.alert_sinks: list[AlertSink] = list(alert_sinks)
        self.record_writers = list(record_writers)
        self.background = list(background)
        self.closers = list(closers)
        self.query_alerts = query_alerts
        self.faults = list(faults)
        self.load_settings = load_settings
        self.reloaders = list(reloaders)
        self.journal = journal
        self.background.append(self.sidecar_clock.run)
        self.stats = IngestStats()
        self.decoder = Decoder(keep_texts=keep_texts)  # owns the cache of valid run names
        # what the runs' clients hear: alerts, stop steps
        self.stop_steps = StopSteps(self.book, self.pipeline.runs, lead=StopLead.of(settings.stop))
        self.taken = batches.TakenBatches()  # client batch ids already ingested (resends are skipped)
        self.owners = launches.JobOwners()  # which job owns each run name (two jobs never share one)

    # -- ingest -------------------------------------------------------------
    def ingest(self, body: bytes, content_type: str | None = None,
               content_encoding: str | None = None, batch_id: str | None = None,
               views: bool = False, launch: str | None = None) -> IngestAnswer:
        """``batch_id``: the client's ``X-Trainhealth-Batch`` (CLIENT/SEQ); a batch already taken is
        answered ``duplicate`` and not ingested again (batches.py). ``views``: the answer also carries
        ``runs``, the view of each run of the batch that has alerts (stop_steps.py), for the client.
        ``launch``: the client's ``X-Trainhealth-Launch`` (who sent it; launches.py)."""
        early = self.screen(batch_id, launch)
        if early is not None:
            return early
        decoded = self.decode(body, content_type, content_encoding)
        if isinstance(decoded, IngestAnswer):
            return decoded
        return self.take(decoded, batch_id, views, launch)

    def screen(self, batch_id: str | None, launch: str | None = None) -> IngestAnswer | None:
        """The answer for a bad or already taken batch id, or a bad launch header, before its body is
        decoded; None to go on."""
        if launch is not None:
            try:
                launches.parse(launch)
            except launches.LaunchError as exc:
                return self.refuse(400, str(exc))
        if batch_id is None:
            return None
        try:
            ident = batches.parse(batch_id)
        except batches.BatchIdError as exc:
            return self.refuse(400, str(exc))
        if self.taken.taken(*ident):
            return IngestAnswer(200, {"accepted": 0, "rejected": 0, "alerts": 0, "duplicate": True})
        return None

    def decode(self, body: bytes, content_type: str | None = None,
               content_encoding: str | None = None) -> Decoded | IngestAnswer:
        """The body's records, or the answer refusing it whole. Touches nothing but the decoder, so the HTTP
        layer runs it off the event loop for large bodies (one at a time: http/app.py)."""
        limits = self.settings.limits
        try:
            return self.decoder.decode_body(body, content_type, content_encoding,
                                            max_records=limits.max_records_per_batch,
                                            max_decoded_bytes=limits.max_decoded_bytes,
                                            max_values=limits.max_values_per_batch)
        except BodyError as exc:
            return self.refuse(exc.status, str(exc))

    def take(self, decoded: Decoded, batch_id: str | None = None, views: bool = False,
             launch: str | None = None) -> IngestAnswer:
        """Feed decoded records to the pipeline; a batch id is taken once (checked again: another request
        with the same id may have been taken while this one was decoded). ``launch``: who sent it."""
        early = self.screen(batch_id, launch)
        if early is not None:
            return early
        ident = batches.parse(batch_id) if batch_id is not None else None
        origin = launches.parse(launch) if launch is not None else None
        answer = self.accept(decoded, views, origin)
        if ident is not None and answer.status == 200:
            self.taken.take(*ident)
        return answer

    def refuse(self, status: int, message: str) -> IngestAnswer:
        self.stats.bodies_refused[status] = self.stats.bodies_refused.get(status, 0) + 1
        return IngestAnswer(status, {"error": message})

    def accept(self, decoded: Decoded, views: bool = False,
               origin: launches.Launch | None = None) -> IngestAnswer:
        """One batch, one pass (docs/code-structure.md): the decoded records go down once (screened here,
        then the pipeline, then the record writers and the watch), and every refusal on the way joins one
        list of rejections, keyed by the record's index in the body, sorted once for the answer."""
        self.stats.batches += 1
        now = self.clock()
        wall = self._watch()
        rejected = list(decoded.rejected)  # the decoder's, in index order; later refusals append
        taken: list[Alert] = []
        records, indexes, conflicts = self._screen(decoded, now, wall, origin, rejected, taken)
        invalid = len(rejected) - conflicts  # the decoder's and the records from the future
        others = [rec for rec in records if rec.type != "sample"]  # starts, heartbeats, ends: few
        starts = [rec for rec in others if rec.type == "start"] if others else others
        if starts:
            self.stop_steps.before(starts)  # a restart forgets the run's stops
        outcome = self.pipeline.process(records, wall=wall,
                                        origin=(origin.host, origin.pid) if origin is not None else None)
        alerts = taken + outcome.alerts if taken else outcome.alerts
        texts = decoded.texts  # by position in the body: the records' own where none was refused before
        if texts is not None and (records is not decoded.records or decoded.rejected):
            texts = [texts[i] for i in indexes]
        if self.journal is not None:
            self.journal.fed(records, wall, self.pipeline.judge_after, texts)
        capped = len(outcome.refused)
        if capped:
            refused = {i for i, _ in outcome.refused}
            rejected += [Rejection(indexes[i], exc.field, exc.reason) for i, exc in outcome.refused]
            kept = [r for i, r in enumerate(records) if i not in refused]
            if others:
                gone = {id(records[i]) for i in refused}
                others = [r for r in others if id(r) not in gone]  # a refused ack counts for nothing
            if texts is not None:
                texts = [t for i, t in enumerate(texts) if i not in refused]
        else:
            kept = records
        if len(rejected) > len(decoded.rejected):  # refusals after decoding: one sort, by index in the body
            rejected.sort(key=_index)
        if kept:
            for record_writer in self.record_writers:
                try:
                    record_writer(kept, texts)
                except Exception:  # like alert sinks: never break ingest
                    log.exception("record writer %r failed", record_writer)
        self.stats.accepted += len(kept)
        names = self.stop_steps.note(kept)
        if others:
            self.stop_steps.heard(others)  # stop acks; starts and ends change who must ack (stop_steps.py)
        if invalid:
            self.stats.reject("invalid", invalid)
        if conflicts:
            self.stats.reject("run_name_taken", conflicts)
        if capped:
            self.stats.reject("capped", capped)
        self.dispatch(alerts)
        status = 200
        if not kept and rejected:
            status = 429 if capped == len(rejected) else 409 if conflicts == len(rejected) else 400
        body: dict[str, Any] = {
            "accepted": len(kept),
            "rejected": len(rejected),
            "alerts": len(alerts),
        }
        if conflicts and not kept:  # one line first, where a client's log shows it (a 409)
            body = {"error": rejected[0].reason, **body}
        if rejected:
            body["errors"] = [r.as_dict() for r in rejected[:MAX_REASONS]]
            if len(rejected) > MAX_REASONS:
                body["errors_truncated"] = len(rejected) - MAX_REASONS
        if views:  # the job hears its alerts: firing ones and agreed stop steps (stop_steps.py)
            shown = self.stop_steps.views(names)
            if shown:
                body["runs"] = shown
        return IngestAnswer(status, body)

    def other_job(self, run: str, launch: str | None) -> str:
        """Why a client of ``launch`` may not hear ``run``'s alerts and stops (another job owns the name), or
        "" (it may; a bad or missing header is not judged here: ingest names it)."""
        if launch is None:
            return ""
        try:
            origin = launches.parse(launch)
        except launches.LaunchError:
            return ""
        return self.owners.other_job(run, origin, self.sidecar_clock.now())

    def _screen(self, decoded: Decoded, now: float, wall: float, origin: launches.Launch | None,
                rejected: list[Rejection], alerts: list[Alert]) -> tuple[list[Record], list[int], int]:
        """The records the pipeline may see, their indexes in the body, and how many were refused because
        another job owns their run name. Refused here, appended to ``rejected`` (in index order):

        - a record from the future (``limits.max_future_seconds`` past ``now``) would move its run's clock
          ahead for good (liveness, expiry);
        - a record of a run another job owns (launches.py; judged only for a batch with ``X-Trainhealth-
          Launch``, see ``_claim``).

        The decoded batch is not touched; a batch with nothing to refuse passes as it is (no copy)."""
        records, indexes = decoded.records, decoded.indexes
        horizon = now + self.settings.limits.max_future_seconds
        future = bool(records) and max(map(_time, records)) > horizon
        verdicts = None
        if origin is not None:  # each run of the batch judged once, in the order of the body
            runs = dict.fromkeys(rec.run for rec in records if rec.time <= horizon) if future \
                else dict.fromkeys(map(_run, records))
            verdicts = self._claim(runs, origin, wall, alerts)
        if not future and verdicts is None:
            return records, indexes, 0
        kept, kept_indexes = [], []
        conflicts = 0
        job = origin.job if origin is not None else ""
        for rec, index in zip(records, indexes):
            if rec.time > horizon:
                rejected.append(Rejection(
                    index, "time", f"{rec.time!r} is {rec.time - now:.0f} s ahead of this sidecar's clock "
                                   "(limits.max_future_seconds): check the sending host's clock"))
            elif verdicts is not None and (why := verdicts.get(rec.run)) is not None:
                conflicts += 1
                self.owners.conflicts[(rec.run, job)].refused += 1
                rejected.append(Rejection(index, "run", why))
            else:
                kept.append(rec)
                kept_indexes.append(index)
        return kept, kept_indexes, conflicts

    def _claim(self, runs: Iterable[str], origin: launches.Launch, wall: float,
               alerts: list[Alert]) -> dict[str, str] | None:
        """Two jobs under one run name never share state (launches.py): the records of a run another job
        owns are refused, said once on the console and as an info alert on the run; a run whose owner is
        done passes to this job, the old job's state forgotten. Returns why each refused run is refused,
        or None when every run of the batch is this job's."""
        refused: dict[str, str] = {}
        for name in runs:
            run = self.pipeline.runs.get(name)
            ok, why = self.owners.claim(name, origin, wall, run is not None and run.ended)
            if ok and why:
                log.warning("%s", why)
                self.stop_steps.forget(name)
                alerts.extend(self.pipeline.forget(name, why))
            elif not ok:
                refused[name] = why
                conflict = self.owners.conflicts[(name, origin.job)]
                if conflict.refused == 0:  # said once: as an alert (its console line), else a warning
                    if run is None:
                        log.warning("%s", why)
                    else:
                        alerts.extend(self.book.apply(name, [firing(
                            "run_name_taken", None, max(0, run_last_step(run)), run.clock, why, "info",
                            job=conflict.owner.job, host=conflict.owner.host, pid=conflict.owner.pid,
                            other_job=origin.job, other_host=origin.host, other_pid=origin.pid)]))
        return refused or None

    # -- alerts out ---------------------------------------------------------
    def dispatch(self, alerts: list[Alert]) -> None:
        """Hand a batch's (or tick's) transitions and the book's refreshed open alerts to the watch and every
        sink; each sink gets copies of its own, refreshes first (an alert refreshed and then resolved in the
        batch shows its final picture before its resolve)."""
        alerts, refreshed = self.book.hand_off(alerts)
        if not alerts and not refreshed:
            return
        self.stats.alerts_raised += sum(1 for a in alerts if a["state"] == "firing")
        self.stop_steps.on_alerts(alerts)
        if refreshed:
            self.stop_steps.on_refreshed(refreshed)
        for sink in self.alert_sinks:
            try:
                if refreshed:
                    sink.refresh([copied(a) for a in refreshed])
                if alerts:
                    sink([copied(a) for a in alerts])
            except Exception:  # an optional sink must never break ingest
                log.exception("alert sink %r failed", sink)

    # -- time and config ----------------------------------------------------
    def tick(self) -> list[Alert]:
        wall = self._watch()
        watched = bool(self.pipeline.runs)
        alerts = self.pipeline.tick_wall(wall)
        if self.owners.conflicts:
            for c in self.owners.quiet(wall):
                run = self.pipeline.runs.get(c.run)
                if run is not None:
                    alerts += self.book.apply(c.run, [resolved(
                        "run_name_taken", None, max(0, run_last_step(run)), run.clock,
                        f"run {c.run}: {c.other.said()} sent nothing for {wall - c.seen:.0f} s "
                        f"({c.refused} of its records refused)")])
        if self.journal is not None and watched:
            self.journal.ticked(wall, self.pipeline.judge_after)
        self.dispatch(alerts)
        return alerts

    def health(self) -> tuple[int, dict[str, Any]]:
        """For /healthz: 503 with the reasons while the store or the recorder cannot write."""
        status, body = healthz(self.faults)
        body["runs"] = len(self.pipeline.runs)
        return status, body

    def _watch(self) -> float:
        """The pipeline's wall time, and whether verdicts wait (the sidecar catching up after a pause)."""
        wall = self.sidecar_clock.now()
        self.pipeline.judge_after = self.sidecar_clock.hold_until
        return wall

    def reload(self) -> dict[str, Any]:
        """Re-read every setting and check it as a start would; apply what can change live (detector
        thresholds, delivery targets), refuse the whole reload if anything else changed (needs a restart)."""
        if self.load_settings is None:
            return {"reloaded": False, "error": "no configuration to reload (started without --config)"}
        try:
            new = self.load_settings()
            self._check_restart_free(new)
        except ConfigError as exc:
            log.error("config reload refused, keeping the running settings: %s", exc)
            return {"reloaded": False, "error": str(exc)}
        closed = self.pipeline.reconfigure(new.detectors)  # a detector disabled: its open alerts resolve
        for reloader in self.reloaders:
            reloader(new)
        self.settings.detectors, self.settings.webhooks = new.detectors, new.webhooks
        self.settings.stop = new.stop
        self.stop_steps.lead = StopLead.of(new.stop)  # stops fixed from now on; those fixed stay as they are
        self.settings.alertmanager = new.alertmanager
        self.settings.server.webhooks, self.settings.server.alertmanager = new.server.webhooks, new.server.alertmanager
        self.dispatch(closed)
        log.info("config reloaded")
        return {"reloaded": True}

    def _check_restart_free(self, new: Settings) -> None:
        for section in ("server", "limits"):
            running, wanted = getattr(self.settings, section), getattr(new, section)
            for f in dataclasses.fields(running):
                if section == "server" and f.name in LIVE_SERVER_KEYS:
                    continue
                a, b = getattr(running, f.name), getattr(wanted, f.name)
                if a != b:
                    shown = "" if f.name == "token" else f" (running {a!r}, the config now says {b!r})"
                    raise ConfigError(f"{section}.{f.name}: needs a restart{shown}")
        if self.settings.exporter != new.exporter:
            raise ConfigError("exporter: needs a restart (the [exporter] table changed)")

    def close(self) -> None:
        for closer in self.closers:
            closer()
