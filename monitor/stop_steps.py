"""What a run's training processes hear back: its firing alerts, and a stop step every rank agrees on.

The job hears its alerts (docs/trainer.md): each ingest answer carries the view of the runs in its batch, and
``GET /v1/runs/{run}/watch`` (a long poll) answers the moment the run's view changes, so every client
of the run learns of an alert within milliseconds of it firing, whichever rank caused it.

Agreement on the stop step. When an alert first fires for a run, this module fixes a *stop step* for
that alert name, once, and never changes it while the run lives: every rank is told the same number.
A client whose ``stop_on`` names the alert makes ``should_stop(step)`` true from that step on, so all
ranks leave the loop after the same step and none waits in a collective for a rank that left. The step
is far enough ahead that every rank learns it before it gets there:

    stop = max(alert step, highest step any rank of the run reported) + lead
    lead = max(min_lead_steps, ceil(lead_seconds / step period)), at most max_lead_steps

``lead_seconds`` (0.1 s by default; ``[stop]`` in docs/config.md) covers the path from the sidecar to the
slowest client (a long poll answer, or the answer to its next urgent send, a few ms on one node); the step
period is the run's own (an average over its recent samples), so at 50 ms steps a NaN at step N stops
every rank after step N+2, or N+3 when a rank had already reported N+1. Stops only grow: a later alert's
stop is never below an earlier one's, so a rank that has heard only the first alert agrees with one that
has heard both.
A restart of the run (a ``start`` from a rank that had sent samples) forgets its stops.

A stop heard too late. When a sample of a step past a stop arrives, that rank completed the step after
the stop, which in synchronous training needs every rank: so nobody stopped there (each client ignores a
stop it hears after it has checked that step). The stop then moves ahead by the same rule, from the
highest step seen, and the clients adopt the new one: the job stops later, and never leaves a rank
waiting in a collective.

A stop every rank takes, or none: confirmation. Samples past the stop cover every rank missing it, not
a *partial* miss: rank 0 hears stop S before it checks step S and leaves the loop; rank 1 hears it just
after checking S, goes on into step S+1's collectives, and waits there for rank 0 forever (no sample
past S ever arrives, so nothing moves; on GPUs that burns the job until the NCCL timeout). So each
client acks every stop step it adopts, at once, in an urgent heartbeat (``stop_ack: {step, checked}``,
docs/record.md): ``checked`` is the last step its loop had asked about when it heard the stop. A stop
is *confirmed* once every live rank of the run (heard from and not ended; a rank of the ``world_size`` never
heard from has no client to ack) acked it in time (``checked < step``); the view's stop says
``confirmed``, and a client's ``should_stop`` turns true at the stop step only once it is confirmed,
waiting there for it (trainer/hearing.py). A late ack (``checked >= step``: that rank passed the stop)
moves every stop not yet confirmed at or below ``checked`` ahead at once, by the same rule from
``max(highest step seen, checked)``, and its acks start over. A confirmed stop never moves (some rank
may have left at it); a restart forgets it like any other. A rank blocked in step S+1's collectives has
checked at most S, and the ranks waiting at S have too, so the moved stop (at least S+2 with the
default ``min_lead_steps``) is heard in time by all of them.

Pure apart from the waiters: no clock, no I/O. The HTTP layer registers a callback per long poll;
``changed`` runs them (in the event loop's thread, where ingest and the timer run).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, Callable, Iterable, Mapping, Sequence

from .alerts import Alert, AlertBook, extra
from .config import StopSettings
from .record import Record
from .state import RunState

MAX_ALERTS_SHOWN = 50  # firing alerts listed in one view; the count is exact
MAX_WAITERS_PER_RUN = 4096
_ALERT_FIELDS = ("alert", "rank", "severity", "step", "time", "summary", "fingerprint")
_run_of = attrgetter("run")


@dataclass(kw_only=True, slots=True)
class StopLead:
    """How far ahead a stop is fixed: the config's ``[stop]`` (docs/config.md)."""

    lead_seconds: float = 0.1
    min_lead_steps: int = 2
    max_lead_steps: int = 1000

    @classmethod
    def of(cls, settings: StopSettings) -> StopLead:
        return cls(lead_seconds=settings.lead_seconds, min_lead_steps=settings.min_lead_steps,
                   max_lead_steps=settings.max_lead_steps)

    def steps(self, period: float | None) -> int:
        """Steps the run makes in ``lead_seconds`` (1% tolerance: record times are measured, not exact)."""
        if period is None or not period > 0:
            return self.min_lead_steps
        return min(self.max_lead_steps, max(self.min_lead_steps, math.ceil(0.99 * self.lead_seconds / period)))


@dataclass(slots=True)
class _Run:
    version: int = 0
    stops: dict[str, dict[str, Any]] = field(default_factory=dict)  # alert name -> the stop fixed for it
    last: dict[int, tuple[int, float]] = field(default_factory=dict)  # rank -> (step, time) of its last sample
    period: float | None = None  # seconds per step, a running average over the ranks' samples
    top_step: int = -1
    first_stop: int | None = None  # the lowest stop step not confirmed (one that may move), None while none
    acks: dict[int, set[int]] = field(default_factory=dict)  # stop step -> ranks that acked it in time
    state: RunState | None = None  # the pipeline's state of the run: a new one means the run was forgotten
    waiters: list[Callable[[], None]] = field(default_factory=list)


class StopSteps:
    """Each run's view for its clients (firing alerts, agreed stop steps, a version) and the long polls
    waiting for it to change."""

    def __init__(self, book: AlertBook, states: Mapping[str, RunState] | None = None,
                 lead: StopLead | None = None, max_runs: int = 10_000, epoch: int | None = None) -> None:
        """``states``: the pipeline's runs (their newest start records tell a restart). ``epoch``: where
        versions start (default: this process's start in milliseconds), so a client that heard version N
        from the sidecar before a restart still hears the views after it as newer."""
        self.book = book
        self.epoch = int(time.time() * 1000) if epoch is None else epoch
        self.states: Mapping[str, RunState] = states if states is not None else {}
        self.lead = lead or StopLead()
        self.max_runs = max_runs
        self.runs: dict[str, _Run] = {}
        self.closed = False  # shutting down: long polls answer at once

    def _run(self, name: str) -> _Run:
        run = self.runs.get(name)
        if run is None:
            if len(self.runs) >= self.max_runs:  # the oldest entry without waiters goes
                for old, state in self.runs.items():
                    if not state.waiters:
                        del self.runs[old]
                        break
            run = self.runs[name] = _Run(version=self.epoch)
        return run

    # -- what arrives -------------------------------------------------------------------------------
    def before(self, records: Sequence[Record]) -> None:
        """A batch's ``start`` records, before the pipeline takes them (the Service passes only those, and
        only for a batch that has one; other records are skipped): a ``start`` from a rank that had sampled
        before it (as the pipeline knows it before this batch) is a restart, and the run's stops are
        forgotten."""
        for rec in records:
            if rec.type != "start":
                continue
            state = self.states.get(rec.run)
            rank = state.ranks.get(rec.rank) if state is not None else None
            sampled = rank.last_sample_time if rank is not None else None
            run = self.runs.get(rec.run)
            if run is not None and sampled is not None and sampled < rec.time:
                self._restart(rec.run, run)

    def heard(self, records: Sequence[Record]) -> None:
        """A batch's records other than samples, once the pipeline took them (the Service passes those): the
        clients' acks of stop steps (``stop_ack`` on a heartbeat), and starts and ends, which change who must
        ack. Confirms a stop every live rank acked in time; a late ack moves the stops it passed."""
        touched: dict[str, _Run] = {}
        for rec in records:
            run = self.runs.get(rec.run)
            if run is None or not run.stops:
                continue
            ack = rec.stop_ack
            if ack is not None and rec.type == "heartbeat":
                if ack.checked is not None and ack.checked >= ack.step:  # that rank passed the stop: nobody stops
                    if any(not s["confirmed"] and s["step"] <= ack.checked for s in run.stops.values()):
                        self._move(rec.run, run, ack.checked)
                elif any(s["step"] == ack.step for s in run.stops.values()):
                    run.acks.setdefault(ack.step, set()).add(rec.rank)
            touched[rec.run] = run
        for name, run in touched.items():
            if self._confirm(name, run):
                self._bump(name, run)

    def _confirm(self, name: str, run: _Run) -> bool:
        """Mark confirmed each stop that every live rank acked in time; True when one was."""
        state = self.states.get(name)
        if state is None or run.first_stop is None:
            return False
        # the ranks heard from, not range(world_size): every client sends its start when it is made, long before
        # any alert, so a rank of the world never heard has no client to hear or ack a stop (a job where only
        # rank 0 reports); waiting for it would stall that job stop_confirm_seconds at every stop
        ranks = state.ranks
        confirmed = False
        for stop in run.stops.values():
            acked = run.acks.get(stop["step"])
            if stop["confirmed"] or not acked:
                continue
            if all(r in acked or rank.ended for r, rank in ranks.items()):
                stop["confirmed"] = confirmed = True
        if confirmed:
            run.first_stop = _lowest_open(run)
        return confirmed

    def note(self, records: Sequence[Record]) -> set[str]:
        """Accepted records: each run's highest step and step period, from the newest record of the run in
        the batch (a client sends its rank's records in order; one dict store per record is all ingest
        pays); a restart (the run's newest ``start`` from a rank that had sent samples) forgets its stops.
        Returns the runs of the batch."""
        newest = dict(zip(map(_run_of, records), records))  # each run's last record in the batch
        for name, rec in newest.items():
            run = self.runs.get(name)
            if run is None:
                run = self._run(name)
            state = self.states.get(name)
            if state is not None and state is not run.state:
                if run.state is not None:  # the pipeline forgot the run (expired, or evicted at the cap):
                    self._restart(name, run)  # a job reusing its name starts with no stops
                run.state = state
            step = rec.step
            if step is None or rec.type not in ("sample", "heartbeat"):
                continue
            if rec.type == "sample":
                prev = run.last.get(rec.rank)
                if prev is not None and step > prev[0] and rec.time > prev[1]:
                    period = (rec.time - prev[1]) / (step - prev[0])
                    run.period = period if run.period is None else 0.8 * run.period + 0.2 * period
                run.last[rec.rank] = (step, rec.time)
            if step > run.top_step:
                run.top_step = step
                if run.first_stop is not None and step > run.first_stop:
                    self._move(name, run, step - 1)
        return set(newest)

    def _restart(self, name: str, run: _Run) -> None:
        run.last.clear()
        run.top_step = -1
        run.period = None
        run.acks.clear()
        if run.stops:
            run.stops.clear()
            run.first_stop = None
            self._bump(name, run)

    def resume(self, open_alerts: Iterable[Alert]) -> None:
        """After a restart: the alerts still open get a stop again (ahead of the run once it reports: a stop
        already passed moves ahead), so a job that was told to stop before the restart still stops in step."""
        self.on_alerts([a for a in open_alerts if a["state"] == "firing"])

    def on_alerts(self, alerts: Iterable[Alert]) -> None:
        """Alert transitions: fix a stop for each alert name's first firing; wake the run's waiters."""
        touched: dict[str, _Run] = {}
        for alert in alerts:
            name = alert["run"]
            run = touched.get(name) or self._run(name)
            touched[name] = run
            if alert["state"] == "firing" and alert["alert"] not in run.stops:
                base = max(int(alert["step"]), run.top_step)
                floor = max((s["step"] for s in run.stops.values()), default=0)
                run.stops[alert["alert"]] = {
                    "step": max(base + self.lead.steps(run.period), floor),
                    "alert": alert["alert"], "rank": _root(alert), "first_step": alert["step"],
                    "severity": alert["severity"], "confirmed": False,
                }
                run.first_stop = _lowest_open(run)
        for name, run in touched.items():
            self._confirm(name, run)  # a new stop at a step every rank already acked is confirmed with it
            self._bump(name, run)

    def on_refreshed(self, alerts: Iterable[Alert]) -> None:
        """Open alerts refreshed in place: a stop's root and severity follow the incident's sharpened picture
        (the client's ``stop_reason`` says what the page and the API say); the stop step never moves."""
        touched: dict[str, _Run] = {}
        for alert in alerts:
            run = self.runs.get(alert["run"])
            stop = run.stops.get(alert["alert"]) if run is not None else None
            if run is None or stop is None:
                continue
            root, severity = _root(alert), alert["severity"]
            if (stop["rank"], stop["severity"]) != (root, severity):
                stop["rank"], stop["severity"] = root, severity
                touched[alert["run"]] = run
        for name, run in touched.items():
            self._bump(name, run)

    def _move(self, name: str, run: _Run, passed: int) -> None:
        """A rank went past step ``passed`` (a sample of the step after it, or a late ack): nobody stops at or
        before it; every stop there not confirmed moves ahead of the run, and its acks start over."""
        ahead = max(run.top_step, passed) + self.lead.steps(run.period)
        for stop in run.stops.values():
            if stop["step"] <= passed and not stop["confirmed"]:
                run.acks.pop(stop["step"], None)
                stop["step"] = ahead
                stop["moved"] = stop.get("moved", 0) + 1
        run.first_stop = _lowest_open(run)
        self._bump(name, run)

    def _bump(self, name: str, run: _Run) -> None:
        run.version += 1
        waiters, run.waiters = run.waiters, []
        for wake in waiters:
            wake()

    # -- what is told -------------------------------------------------------------------------------
    def version(self, name: str) -> int:
        run = self.runs.get(name)
        return 0 if run is None else run.version

    def view(self, name: str) -> dict[str, Any]:
        """{version, stops: {alert: {step, alert, rank, first_step, severity, confirmed[, moved]}},
        alerts: [firing now], alerts_total}: what a client of the run needs to act."""
        run = self.runs.get(name)
        if run is None:
            return {"version": 0, "stops": {}, "alerts": [], "alerts_total": 0}
        # the book's own dicts, only looked at (firing() would copy each on every ingest answer)
        firing = sorted((a for (r, _, _), a in self.book.open.items() if r == name), key=lambda a: a["time"])
        return {
            "version": run.version,
            "stops": {k: dict(v) for k, v in run.stops.items()},
            "alerts": [{k: a.get(k) for k in _ALERT_FIELDS} for a in firing[:MAX_ALERTS_SHOWN]],
            "alerts_total": len(firing),
        }

    def views(self, names: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The views of the runs that have one (for an ingest answer: nothing when all is quiet)."""
        return {n: self.view(n) for n in names if self.version(n) > self.epoch}

    def wait(self, name: str, wake: Callable[[], None]) -> bool:
        """Call ``wake`` once at the run's next change; False when too many already wait on it."""
        run = self._run(name)
        if self.closed or len(run.waiters) >= MAX_WAITERS_PER_RUN:
            return False
        run.waiters.append(wake)
        return True

    def cancel(self, name: str, wake: Callable[[], None]) -> None:
        run = self.runs.get(name)
        if run is not None and wake in run.waiters:
            run.waiters.remove(wake)

    def wake_all(self) -> None:
        """Shutdown: every long poll answers now, and later ones at once."""
        self.closed = True
        for run in self.runs.values():
            waiters, run.waiters = run.waiters, []
            for wake in waiters:
                wake()

    def forget(self, name: str) -> None:
        run = self.runs.pop(name, None)
        if run is not None:
            for wake in run.waiters:
                wake()


def _lowest_open(run: _Run) -> int | None:
    """The lowest stop step of the run not confirmed (a rank past it moves it), None if none."""
    return min((s["step"] for s in run.stops.values() if not s["confirmed"]), default=None)


def _root(alert: Alert) -> int | None:
    """The rank a stop is for: a per-rank alert's rank, or a run-level incident's first (root) rank."""
    rank = alert["rank"]
    return rank if rank is not None else extra(alert).get("first_rank")

