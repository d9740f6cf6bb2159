"""The pipeline (docs/code-structure.md): records -> run state -> detectors -> alert transitions.

The same object runs in the server and in ``trainhealth replay``. It is pure:
time is the records' own ``time``; the server adds wall time only through
``tick_wall`` (time passing with no records), which extrapolates each run's
record clock by the wall time since its newest record arrived.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Callable, Iterable, Iterator, Sequence

import msgspec

from .alerts import Alert, AlertBook
from .config import Limits
from .detectors import ALL, Detector
from .detectors.base import GPU_HEALTH
from .detectors.helpers.incident import ranks_phrase
from .events import Event, resolved
from .record import RECORD_TYPES, Record
from .state import RankState, RunState
from .textbudget import TextBudget

log = logging.getLogger(__name__)


class CapExceeded(ValueError):
    """A record refused because a cap (runs, ranks per run) is reached."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(slots=True)
class Outcome:
    alerts: list[Alert]
    refused: list[tuple[int, CapExceeded]]  # (index in the batch, why)


_step_and_time = attrgetter("step", "time")
_Update = Callable[[Record], list[Event]]
_ByType = dict[str, list[_Update]]
# a run's detectors; their bound update methods by record type, for records without and with a GPU reading
# (each list holds only the detectors that read such a record: Detector.record_types); and the bound tick
# methods of those that have one
_Bound = tuple[list[Detector[Any]], tuple[_ByType, _ByType], list[tuple[Detector[Any], Callable[[float], list[Event]]]]]


def _order_key(records: Sequence[Record]) -> Callable[[int], tuple[int, float]]:
    """Order by step then time; a record without a step takes its rank's previous step."""
    keys = list(map(_step_and_time, records))
    for step, _ in keys:
        if step is None:
            break
    else:  # every record has its step (the common case)
        return keys.__getitem__
    prev: dict[tuple[str, int], int] = {}
    keys = []
    for rec in records:
        ident = (rec.run, rec.rank)
        step = rec.step if rec.step is not None else prev.get(ident, -1)
        prev[ident] = step
        keys.append((step, rec.time))
    return keys.__getitem__


class Pipeline:
    def __init__(self, detector_settings: dict[str, Any], limits: Limits | None = None,
                 tick_seconds: float = 1.0, detectors: Sequence[type[Detector[Any]]] = ALL,
                 book: AlertBook | None = None) -> None:
        self.detector_settings = detector_settings
        self.limits = limits or Limits()
        self.tick_seconds = tick_seconds
        self.detector_classes = list(detectors)
        self.runs: dict[str, RunState] = {}
        self.detectors: dict[str, list[Detector[Any]]] = {}
        self.book = book or AlertBook()
        self.restored_runs: dict[str, float] = {}  # run -> wall time last seen, for alerts restored at start
        self.records_processed = 0
        self.detector_errors: dict[str, int] = {}  # detector name -> exceptions caught (a bug to fix)
        self.owners: dict[str, str] = {}  # alert name -> the detector that raised it (for a reload's disable)
        # server only: wall time before which no tick judges (the sidecar catching up after its own pause
        # or a restart, see sidecar_clock.py); records are still taken
        self.judge_after = -math.inf
        self._heard: dict[str, set[int]] = {}  # during a hold: each run's ranks read since it began
        self._hold = -math.inf  # the judge_after that _heard belongs to
        self._bound: dict[str, _Bound] = {}
        self.text = TextBudget(self.limits.max_text_bytes)  # OOM details and start configs, all runs together

    # -- configuration ------------------------------------------------------
    def reconfigure(self, detector_settings: dict[str, Any]) -> list[Alert]:
        """New thresholds, same state. A detector the new settings disable has its open alerts resolved,
        whichever detector it is (returned: the transitions to dispatch)."""
        was = self.detector_settings
        self.detector_settings = detector_settings
        for dets in self.detectors.values():
            for det in dets:
                det.settings = detector_settings[det.name]
        disabled = {name for name, s in detector_settings.items()
                    if not getattr(s, "enabled", True) and getattr(was.get(name), "enabled", True)}
        if not disabled:
            return []
        alerts: list[Alert] = []
        for name in list(self.runs) + [r for r in self.restored_runs if r not in self.runs]:
            run = self.runs.get(name)
            step = run_last_step(run) if run is not None else None
            events = [resolved(a["alert"], a["rank"], max(0, a["step"] if step is None else step),
                               run.clock if run is not None else a["time"],
                               f"detector {owner} disabled by a config reload", resolved_by="detector_disabled")
                      for a in self.book.firing(name)
                      if (owner := self.owners.get(a["alert"], a["alert"])) in disabled]
            if events:
                alerts.extend(self.book.close(name, events))
        return alerts

    # -- records ------------------------------------------------------------
    def process(self, records: Sequence[Record], wall: float = 0.0,
                origin: tuple[str, int] | None = None) -> Outcome:
        """Feed a batch (any order); returns alert transitions and refused records. ``origin``: the
        (host, pid) that sent it (X-Trainhealth-Launch): its ranks' host and pid, without a start record.

        Each record: its run's and rank's state, then the detectors that read its type, then a tick when
        a second of record time has passed, then the alert book. Written out in one loop (no call per record
        but the rank's and the detectors'): this is the path every record of ingest and replay takes."""
        alerts: list[Alert] = []
        refused: list[tuple[int, CapExceeded]] = []
        order = range(len(records))
        if len(records) > 1:
            order = sorted(order, key=_order_key(records))  # type: ignore[assignment]
        runs, book, text, tick_seconds = self.runs, self.book, self.text, self.tick_seconds
        hold = wall < self.judge_after  # a hold: no verdict in a batch (the timer's tick gives it, see tick_wall)
        table_of: RunState | None = None  # the run whose detectors ``updates`` holds (a batch is most often one run)
        updates: _ByType = {}
        health_updates: _ByType = {}  # for a record with a GPU reading
        for i in order:
            rec = records[i]
            run = runs.get(rec.run)
            if run is None or (rank := run.ranks.get(rec.rank)) is None:
                try:
                    run = self._admit(rec, wall, alerts)
                except CapExceeded as exc:
                    refused.append((i, exc))
                    continue
                rank = run.ranks[rec.rank]
            if origin is not None and (rank.pid != origin[1] or rank.host != origin[0]):
                rank.host, rank.pid = origin
            kind = rec.type
            if rec.step is None and kind == "end":  # a launcher's end: the rank's last known step
                rec = msgspec.structs.replace(rec, step=max(0, rank.last_step))
            if run is not table_of:  # a run made anew (a forgotten one back) is another object: looked up again
                table_of, (updates, health_updates) = run, self._bound_methods(run.run)[1]
            run.records += 1
            run.last_wall = wall
            rank.apply(rec)
            if kind == "start":
                run.add_start(rec)
                if rec.config:
                    text.hold(rec)
            elif kind == "oom" and rec.detail and rank.last_oom is not None:
                text.hold(rank.last_oom)
            events: list[Event] = []
            # bound methods (the detector is update.__self__) of the detectors that read this record
            for update in (updates if rec.gpu_health is None else health_updates)[kind]:
                try:
                    out = update(rec)
                except Exception:  # one detector's bug must not fail the batch nor blind the others
                    out = self._detector_failed(update.__self__, rec.run, rec.rank, rec.step)  # type: ignore[attr-defined]
                if out:
                    self._own(update.__self__, out)  # type: ignore[attr-defined]
                    events += out
            if rec.time > run.clock or run.records == 1:  # a new run: its wall clock starts now
                run.clock = rec.time
                run.clock_wall = wall
            if hold:
                self._heard_during_hold().setdefault(run.run, set()).add(rec.rank)
            elif run.clock - run.last_tick >= tick_seconds:
                events.extend(self._tick_run(run, run.clock))
            done = book.apply(run.run, events) if events else None
            if done:
                alerts += done
            if (kind == "end" or done) and run.ended:  # every rank has ended: nothing of the run stays open
                alerts += self._close_ended(run)
        self.records_processed += len(records) - len(refused)
        if refused:
            refused.sort(key=lambda r: r[0])
        return Outcome(book.current(alerts) if alerts else alerts, refused)  # as they stand at its end

    def _admit(self, rec: Record, wall: float, alerts: list[Alert]) -> RunState:
        run = self.runs.get(rec.run)
        if run is None:
            if len(self.runs) >= self.limits.max_runs and not self._make_room(rec.run, alerts):
                raise CapExceeded("run", f"the sidecar already tracks {len(self.runs)} runs "
                                         f"(limits.max_runs); {rec.run!r} is refused")
            run = RunState(run=rec.run, clock=rec.time, last_tick=rec.time,
                           clock_wall=wall, last_wall=wall)
            self.runs[rec.run] = run
            self.detectors[rec.run] = [
                cls(self.detector_settings[cls.name], run) for cls in self.detector_classes
            ]
        if rec.rank not in run.ranks:
            if len(run.ranks) >= self.limits.max_ranks_per_run:
                raise CapExceeded("rank", f"run {rec.run!r} already has {len(run.ranks)} ranks "
                                          f"(limits.max_ranks_per_run); rank {rec.rank} is refused")
            run.ranks[rec.rank] = RankState(rank=rec.rank)
        return run

    def _make_room(self, newcomer: str, alerts: list[Alert]) -> bool:
        """At the run cap, an ended run (every rank sent ``end``) gives way, the longest-idle first:
        a sweep of short jobs must not be refused until run_ttl_seconds forgets the finished ones."""
        ended = [r for r in self.runs.values() if r.ended]
        if not ended:
            return False
        oldest = min(ended, key=lambda r: (r.last_wall, r.clock))
        alerts.extend(self.forget(oldest.run, f"run {oldest.run} ended and was dropped to make room "
                                              f"for run {newcomer} (limits.max_runs)"))
        return True

    def _bound_methods(self, run: str) -> _Bound:
        """The run's detectors' bound ``update`` methods by record type (for records without, and with, a GPU
        reading), and ``tick`` of those that have one (the base class's does nothing), made once per run, not
        per record; made again when ``self.detectors`` holds another list for the run (a checkpoint restore
        replaces it)."""
        dets = self.detectors[run]
        cached = self._bound.get(run)
        if cached is not None and cached[0] is dets:
            return cached
        plain: _ByType = {kind: [det.update for det in dets if kind in det.record_types] for kind in RECORD_TYPES}
        health: _ByType = {kind: [det.update for det in dets
                                  if kind in det.record_types or GPU_HEALTH in det.record_types]
                           for kind in RECORD_TYPES}
        ticks: list[tuple[Detector[Any], Callable[[float], list[Event]]]] = [
            (det, det.tick) for det in dets if type(det).tick is not Detector.tick]
        made: _Bound = (dets, (plain, health), ticks)
        self._bound[run] = made
        return made

    def _own(self, det: Detector[Any], events: list[Event]) -> None:
        owners = self.owners
        for ev in events:
            if ev.alert not in owners:
                owners[ev.alert] = det.name

    def _close_ended(self, run: RunState) -> list[Alert]:
        """Every rank of the run sent ``end``: its open alerts resolve, saying how the run ended
        ("run ended completed at step 3043", "run failed at step 812 (rank 3 ended failed)")."""
        if not self.book.firing(run.run):
            return []
        # the detectors' pictures still waiting for a tick (more ranks failed, more went NaN) first
        alerts = self.book.apply(run.run, self._tick_run(run, run.clock))
        open_alerts = self.book.firing(run.run)
        step = max(0, run_last_step(run))
        failed = sorted(q for q, r in run.ranks.items() if r.end_status == "failed")
        if failed:
            why = f"run failed at step {step} ({ranks_phrase(failed)} ended failed)"
        elif all(r.end_status == "completed" for r in run.ranks.values()):
            why = f"run ended completed at step {step}"
        else:
            why = f"run ended at step {step}"
        events = [resolved(a["alert"], a["rank"], step, run.clock, why,
                           resolved_by="run_failed" if failed else "run_ended") for a in open_alerts]
        return alerts + self.book.close(run.run, events)

    def findings(self, name: str) -> dict[str, Any]:
        """The run's detector facts by detector name (only detectors with something to say)."""
        out: dict[str, Any] = {}
        for det in self.detectors.get(name, ()):
            facts = det.facts()
            if facts:
                out[det.name] = facts
        return out

    # -- time ---------------------------------------------------------------
    def _tick_run(self, run: RunState, now: float) -> list[Event]:
        run.last_tick = now
        events: list[Event] = []
        for det, tick in self._bound_methods(run.run)[2]:
            try:
                out = tick(now)
            except Exception:
                out = self._detector_failed(det, run.run, None, None)
            if out:
                self._own(det, out)
                events.extend(out)
        return events

    def _detector_failed(self, det: Detector[Any], run: str, rank: int | None, step: int | None) -> list[Event]:
        n = self.detector_errors[det.name] = self.detector_errors.get(det.name, 0) + 1
        if n <= 10 or n % 1000 == 0:  # the first ones in full, then a reminder
            log.exception("detector %s failed on run %s rank %s step %s (%d times)", det.name, run, rank, step, n)
        return []

    def restore(self, alerts: Sequence[Alert], last_seen: dict[str, float], wall: float) -> None:
        """Alerts open when the sidecar stopped: back into the book, so a repeated ``firing`` stays
        deduplicated and a later ``resolved`` closes them. A run that never sends again has them resolved
        ``limits.run_ttl_seconds`` after it was last seen (``tick_wall``), as a live run's would."""
        for alert in alerts:
            self.book.restore(alert)
            self.restored_runs.setdefault(alert["run"], last_seen.get(alert["run"], wall))

    def _expire_restored(self, wall: float) -> list[Alert]:
        alerts: list[Alert] = []
        for name, seen in list(self.restored_runs.items()):
            idle = wall - seen
            if name in self.runs or idle > self.limits.run_ttl_seconds:
                del self.restored_runs[name]  # back: it expires like any run; or gone for good
            if name not in self.runs and idle > self.limits.run_ttl_seconds:
                why = f"run {name} expired after {idle:.0f}s without records (alert restored after a restart)"
                events = [resolved(a["alert"], a["rank"], a["step"], wall, why) for a in self.book.firing(name)]
                alerts.extend(self.book.apply(name, events))
        return alerts

    def tick_wall(self, wall: float) -> list[Alert]:
        """Server timer: let time pass for every run, and forget expired runs."""
        alerts: list[Alert] = self._expire_restored(wall) if self.restored_runs else []
        for run in list(self.runs.values()):
            idle = max(0.0, wall - run.last_wall)
            if idle > self.limits.run_ttl_seconds:
                alerts.extend(self.forget(run.run, f"run {run.run} expired after {idle:.0f}s "
                                                   f"without records"))
                continue
            now = run.clock + max(0.0, wall - run.clock_wall)
            if now - run.last_tick >= self.tick_seconds and self._may_judge(run, wall):
                alerts.extend(self.tick_run(run, now))
        return alerts

    def tick_run(self, run: RunState, now: float) -> list[Alert]:
        """One timer tick of ``run`` at ``now`` (its record time): ``tick_wall``'s for each run, and replay's
        while a run's records pause."""
        events = self._tick_run(run, now)
        if not events:
            return []
        alerts = self.book.apply(run.run, events)
        if run.ended:
            alerts.extend(self._close_ended(run))
        return alerts

    def _heard_during_hold(self) -> dict[str, set[int]]:
        if self._hold != self.judge_after:  # a new hold: nobody heard from yet
            self._hold, self._heard = self.judge_after, {}
        return self._heard

    def _may_judge(self, run: RunState, wall: float) -> bool:
        """Outside a hold, yes; during one, once every rank of the run still training has been read since
        it began (its queued and retried records are in), so that a short stall is not missed."""
        if wall >= self.judge_after:
            return True
        heard = self._heard_during_hold().get(run.run, ())
        return all(rank in heard for rank, r in run.ranks.items() if not r.ended)

    def forget(self, name: str, why: str) -> list[Alert]:
        """Drop a run; its open alerts resolve."""
        run = self.runs.pop(name, None)
        self.detectors.pop(name, None)
        self._bound.pop(name, None)
        if run is None:
            return []
        events = [resolved(a["alert"], a["rank"], max(0, run_last_step(run)), run.clock, why)
                  for a in self.book.firing(name)]
        return self.book.apply(name, events)


def run_last_step(run: RunState) -> int:
    return max((r.last_step for r in run.ranks.values()), default=0)


def replay(records: Iterable[Record], pipeline: Pipeline, *, max_batch: int = 256,
           until: float | None = None, refreshes: bool = False) -> Iterator[Alert]:
    """The replay loop (``trainhealth replay``, tests, benchmarks): feed records in order, record time
    as the clock, and yield alert transitions as they happen. While a run's records pause, and after the
    last record, its detectors tick every ``tick_seconds``, as the server's timer ticks them.

    Records go in batches of at most ``max_batch``, each within one tick (``pipeline.tick_seconds``) of
    record time: a batch is sorted by step, and keeping it short keeps the clock honest (a rank stuck at
    a lower step must not have its records applied minutes late). ``until``: after the last record, let
    that many seconds pass with no records, as the server's timer would (a ``tick_wall`` every
    ``tick_seconds``), so a hang or a silent rank at the end of a recording is reported (replay runs with
    wall = 0, so ``tick_wall(w)`` moves each run's clock on by ``w`` from its own last record).

    ``refreshes``: after each batch (and the final tick) also yield the open alerts refreshed in place
    since the last one, as the server hands them to its sinks (``AlertBook.hand_off``: before that
    batch's transitions; a firing refreshed in its own batch is yielded once, with its latest picture):
    each a copy of the alert as it stands then, marked ``refreshed: True``. The transitions yielded are
    the same either way."""
    def handed(alerts: list[Alert]) -> list[Alert]:
        if not refreshes:
            return alerts
        alerts, refreshed = pipeline.book.hand_off(alerts)
        for a in refreshed:  # copies: the book's own dicts stay unmarked
            a["refreshed"] = True
        return refreshed + alerts if refreshed else alerts

    batch: list[Record] = []
    tick = pipeline.tick_seconds
    runs, ttl = pipeline.runs, pipeline.limits.run_ttl_seconds

    def paused(batch: list[Record]) -> Iterator[list[Alert]]:
        """The server's timer ticks a run every tick_seconds while its records pause (a hang, heartbeats
        only, a checkpoint save): so does replay, on the run's own clock, before the batch that ends the
        pause. A verdict due in the pause is judged then, on what was known then (the ranks waiting, the
        memory figures), as the server judges it, not at the next record with that record applied. Per run,
        so a run replayed alone (--jobs) ticks the same. A batch spans less than a tick: pauses fall between
        batches, and batches of any size tick alike. At most ``limits.run_ttl_seconds`` of a pause is ticked
        (the server forgets a run silent that long; replay keeps it, as it always did). Each tick's
        transitions apart, so that its refreshes are handed out after it, as the server's are."""
        firsts: dict[str, float] = {}
        for rec in batch:
            t = firsts.get(rec.run)
            if t is None or rec.time < t:
                firsts[rec.run] = rec.time
        for name, t in firsts.items():
            run = runs.get(name)
            if run is None:
                continue
            now, end = run.clock + tick, min(t, run.clock + ttl)
            while now < end:
                if now - run.last_tick >= tick:
                    yield pipeline.tick_run(run, now)
                now += tick

    for rec in records:
        if batch and (len(batch) >= max_batch or rec.time - batch[0].time >= tick):
            for ticked in paused(batch):
                yield from handed(ticked)
            yield from handed(pipeline.process(batch).alerts)
            batch = []
        batch.append(rec)
    for ticked in paused(batch):
        yield from handed(ticked)
    yield from handed(pipeline.process(batch).alerts)
    if until is None:
        return
    # After the last record, the server's timer: a tick every tick_seconds, not one tick at ``until``. A
    # detector judges what it sees at its tick's moment (the ranks silent then, a pending verdict); one late
    # tick would picture an alert that fired 14 s after the last record with every rank that had crossed its
    # limit by ``until`` (ranks still sending at the end of the file, judged silent only because the file
    # ended), where the sidecar, watching then, named only the rank that had gone silent (docs/liveness.md,
    # "The end of a recording"). Each run's clock moves on from its own last record (wall = 0 in replay), so
    # a run replayed alone (--jobs) ticks the same. Stops early when every run has expired (run_ttl_seconds).
    steps = max(1, math.ceil(until / tick - 1e-9))
    for k in range(1, steps + 1):
        yield from handed(pipeline.tick_wall(min(k * tick, until)))
        if not pipeline.runs and not pipeline.restored_runs:
            break
