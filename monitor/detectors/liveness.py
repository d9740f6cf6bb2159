"""rank_stalled: a rank stopped finishing steps (hung) or stopped sending anything (gone or frozen).

Two conditions per rank, checked as time passes (``tick``):

* stuck: its ``step`` has not advanced for longer than the step limit while
  records (heartbeats) still come: blocked in a collective or in data loading.
* silent: no record at all for longer than the silence limit: the process is
  gone or frozen. A rank that never sent a heartbeat is only silent once the
  step limit passes (its samples are its only sign of life).

The step limit adapts to the run (like NVIDIA's fault-tolerance launcher,
which sets its timeouts to a safety factor times the longest interval it has
observed): ``min(max(floor, factor x longest interval between two step
advances seen in this run), ceiling)``. A checkpoint pause, once seen, raises
it; a model with 90 s steps gets 270 s. Before a rank's first step advance
after a ``start`` (start-up, compilation, checkpoint loading) the limit is at
least ``startup_seconds``. The silence limit learns the longest gap between a
heartbeating rank's records the same way.

One incident, one page: the run has at most one open rank_stalled alert
(``rank`` null). It names the root (helpers/stall_story.py): the ranks that went
silent while others still send heartbeats (and their host, when they are all of
one host's ranks: a node down), else the ranks left behind at the lowest step,
else (all ranks at one step) those whose heartbeats say they wait for data
(``phase`` "data") while the others wait in the step's collectives. Ranks that
only wait are listed in its fields (``waiting_ranks``) and in ``facts()``; as
more ranks cross their limits the alert is refreshed in place (same
fingerprint, no second page). It resolves when no rank is stalled any more.

An alert's ``time`` is the moment the first limit was crossed (last advance +
limit), so the server (timer ticks on the wall clock) and replay (ticks on
record time) report the same alert.

A rank that sent a clean ``end`` (status "completed", or none from an older
client) is finished, not dead, and so is every rank that has not gone past the
step at which another rank ended (in synchronous training nobody ends while
others still train). A rank that ended ``failed`` is gone, not silent: when
its error is its own (a CUDA error, a bug), rank_failed owns the incident and
the others' stall is not paged here; when its error says a peer went away
first (a collective error: "Connection closed by peer"), or it was stopped by
SIGTERM (torchrun stops the survivors of a dead rank so: its client, or its
launcher, says so before it dies), it is a consequence, listed in
``failed_ranks`` of the stall it followed. A rank that sent an
``oom`` record and never finished a step after it is gpu_oom's incident. A new
``start`` or a step advance resolves; so does ``end``.

A rank quiet since before another rank's collective error (or SIGTERM) is a suspect: its
silence limit shrinks to 1.5 s after the error when every other rank is
finished, else to 1.5 of its heartbeat periods + 1.5 s ("rank 1 exited without
an end record"); the 1.5 s let its launcher's own word arrive first.

A tick that finds no rank stalled notes the earliest moment one could cross a
limit; the ticks before it return at once (``_deadline``), unless a record
changed what the limits are made of in a way that brings that moment closer.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from statistics import median
from typing import Any

from ..config.rules import flag, ordered, positive
from ..events import Event, firing, resolved
from ..record import Record
from ..state import RunState
from .base import Detector
from .helpers.incident import OomFacts, death, oom_error
from .helpers.stall_story import RankClock as _Rank
from .helpers.stall_story import describe

PEER_GRACE_SECONDS = 1.5  # after a collective error, for the quiet rank's launcher to say how it died
PEER_BEATS = 1.5  # ... and a suspect is gone after this many of its heartbeat periods without a word
RECENT_INTERVALS = 64  # step intervals kept for the "typical" figure in summaries
DEADLINE_MARGIN = 1e-3  # seconds: the deadline's sum is rounded, the tick's comparisons are not
ADVANCED = "advanced"  # a step advance (its summary words are made only when an alert is open)


@dataclass(kw_only=True, slots=True)
class RankStalledSettings:
    enabled: bool = True
    floor_seconds: float = 180.0  # never report a stall sooner than this
    factor: float = 3.0  # x the longest step interval (or record gap) seen in this run
    ceiling_seconds: float = 1800.0  # learned limits never exceed this
    startup_seconds: float = 600.0  # limit before a rank's first step advance after a start
    silence_floor_seconds: float = 60.0  # a heartbeating rank silent this long is gone

    def __post_init__(self) -> None:
        flag(self, "rank_stalled", "enabled")
        positive(self, "rank_stalled", "floor_seconds", "factor", "ceiling_seconds", "startup_seconds",
                 "silence_floor_seconds")
        ordered(self, "rank_stalled", "factor", ">=", 1)
        ordered(self, "rank_stalled", "ceiling_seconds", ">=", self.floor_seconds, "floor_seconds")


class RankStalled(Detector[RankStalledSettings]):
    name = "rank_stalled"
    Settings = RankStalledSettings

    def __init__(self, settings: RankStalledSettings, run: RunState) -> None:
        super().__init__(settings, run)
        self.ranks: dict[int, _Rank] = {}
        self.now = -math.inf
        self.longest = 0.0  # longest interval between two step advances of one rank
        self.recent: deque[float] = deque(maxlen=RECENT_INTERVALS)
        self.longest_gap = 0.0  # longest gap between two records of a heartbeating rank
        self.end_step: int | None = None  # highest step at which a rank sent a clean `end`
        self.end_time = -math.inf
        self.root_failed: dict[int, str] = {}  # rank -> its own crash (rank_failed's incident)
        self.peer_failed: dict[int, str] = {}  # rank -> its collective error (a consequence)
        self.peer_times: dict[int, float] = {}  # rank -> when it failed so
        self.peer_stopped: set[int] = set()  # those of them stopped by SIGTERM (the job being stopped)
        self.peer_cut = -math.inf  # the first collective error: ranks quiet since before it are suspects
        self.peer_at_once = False  # every rank but the suspects is finished: they are named at once
        self.oom: set[int] = set()  # ranks with an oom record and no step since (gpu_oom's incident)
        self.stalled: dict[int, tuple[str, float, float]] = {}  # rank -> (reason, crossed at, limit)
        self.open = False  # the run's incident is firing
        self.signature: tuple[frozenset[tuple[int, str]], frozenset[int]] | None = None
        self.picture: dict[str, Any] = {}  # the open incident's fields, for facts()
        # No rank can cross a limit before this record time (``_deadline``), unless a record changed what
        # the limits are made of in a way that can bring one closer (then it is -inf: judge the next tick)
        self.deadline = -math.inf
        self.judged: RankStalledSettings | None = None  # the settings it was computed with

    # -- records ------------------------------------------------------------
    def update(self, record: Record) -> list[Event]:
        t = record.time
        if t > self.now:
            self.now = t
        kind = record.type
        rank = record.rank
        r = self.ranks.get(rank)
        if r is None:
            r = self.ranks[rank] = _Rank(advance_time=t, seen=t)
            self.deadline = -math.inf
        elif t > r.seen:
            if t - r.seen > self.longest_gap and r.beats and not r.after_start:
                self.longest_gap = t - r.seen
            r.seen = t
        if r.retired:
            r.retired = False
            self.deadline = -math.inf
        why = ""
        if kind == "start":
            r.after_start = True
            self.deadline = -math.inf  # what is finished, failed or gone changes (so for end and oom)
            r.kept = r.shown
            r.advance_time, r.step, r.advanced, r.beats, r.ended = t, -1, False, False, False
            r.sample_step, r.said, r.error = -1, None, ""
            self._forget_failure(rank)
            why = "started again"
            if t > self.end_time:
                self.end_step = None
            if record.world_size:
                self._retire_beyond(record.world_size, t)
        elif kind == "end":
            r.after_start = False
            self.deadline = -math.inf
            said = None
            if record.status == "failed":
                said = death(record.error, signal=record.signal, exit_code=record.exit_code,
                             forwarded=bool(record.signal_forwarded), oom_killed=bool(record.oom_killed),
                             stderr_tail=record.stderr_tail, oom=OomFacts.of(record))
                if said.cause != "exception" and record.error is None and r.ended and not r.error:
                    said = None  # its launcher's word after its own clean end: a deliberate exit code
                elif said.cause == "stopped" and r.ended and r.error:
                    said = None  # stopped after it failed (torchrun stops what is left): its first word stands
            r.ended = True
            r.end_time = max(r.end_time, t)
            if said is not None:
                r.error = said.quoted
                if said.peer:
                    self.peer_failed[rank] = r.error
                    self.peer_times[rank] = t
                    if said.cause == "stopped":
                        self.peer_stopped.add(rank)
                    else:
                        self.peer_stopped.discard(rank)
                    self._peer_suspects()
                elif oom_error(record.error) and rank in self.oom:
                    pass  # gpu_oom's incident already
                else:
                    self.root_failed[rank] = r.error
                why = f"failed ({r.error})"
            elif record.status == "failed":
                why = "ended"  # the clean end before it said so
            else:
                if record.step is not None and (self.end_step is None or record.step > self.end_step):
                    self.end_step = record.step
                self.end_time = max(self.end_time, t)
                why = "ended"
        else:
            if r.after_start:  # only a start sets it: stored when it changes, not on every record
                r.after_start = False
            if kind != "oom" and t >= r.phase_seen:  # a heartbeat or a sample says what the rank does
                r.phase_seen, r.said = t, record
            if kind == "heartbeat":
                if not r.beats:
                    self.deadline = -math.inf  # its silence limit is the heartbeats' now, maybe shorter
                r.beats = True
                if t > r.last_beat:
                    if r.last_beat > -math.inf:
                        r.beat_gap = t - r.last_beat
                    r.last_beat = t
            elif kind == "oom":
                self.deadline = -math.inf
                self.oom.add(rank)
            step = record.step
            if step is not None:
                if r.step < 0:  # baseline after a start or at first sight: not progress yet
                    self.deadline = -math.inf
                    r.step = step
                elif step > r.step:
                    if r.advanced:
                        interval = t - r.advance_time
                        if interval > 0:
                            self.recent.append(interval)
                            if interval > self.longest:
                                self.longest = interval
                        else:
                            self.deadline = -math.inf  # an advance older than the last: its limit ends sooner
                    else:
                        self.deadline = -math.inf  # its limit leaves start-up
                        r.advanced = True
                    if self.end_step is not None:
                        self.deadline = -math.inf  # it may pass the step a rank ended at (finished no more)
                    r.step = step
                    r.advance_time = t
                    # training again after its end (not a late record from before it); nothing to undo when
                    # it neither ended nor failed (the common case: three cheap tests)
                    if (r.ended or r.error or self.oom) and t > r.end_time:
                        if r.ended:
                            self.deadline = -math.inf  # finished no more: its limits count again
                        r.ended = False
                        if rank in self.oom or r.error:
                            r.error = ""
                            self._forget_failure(rank)
                    why = ADVANCED  # the words are only needed with an alert open: made below
                elif kind == "sample" and step < r.sample_step and t > r.advance_time:
                    # its training thread went back: restarted without a start record. (A heartbeat
                    # may carry an older step than the sample before it: the threads race.)
                    r.step = step
                    r.advance_time, r.advanced, r.sample_step = t, False, step
                    self.deadline = -math.inf
                    why = f"restarted at step {step}"
                if kind == "sample" and step > r.sample_step:
                    r.sample_step = step
        if not self.open:
            return []
        self.deadline = -math.inf  # the open incident's picture may change with any record: the next tick judges
        if why is ADVANCED:
            why = f"advanced to step {r.step}"
        if self.root_failed or self.oom:
            return [self._resolve(t, rank, why)]
        if kind in ("start", "end"):
            check = list(self.stalled)
        elif rank in self.stalled:
            check = [rank]
        else:
            return []
        for q in check:
            if self._stalled(self.ranks[q], self.now) is None:
                del self.stalled[q]
        return [self._resolve(t, rank, why)] if not self.stalled else []

    def _forget_failure(self, rank: int) -> None:
        self.root_failed.pop(rank, None)
        self.peer_failed.pop(rank, None)
        self.peer_stopped.discard(rank)
        if self.peer_times.pop(rank, None) is not None:
            self._peer_suspects()
        self.oom.discard(rank)

    def _retire_beyond(self, world_size: int, t: float) -> None:
        for rank, r in self.ranks.items():
            if rank >= world_size and r.seen < t:
                r.retired = True

    # -- time ---------------------------------------------------------------
    def tick(self, now: float) -> list[Event]:
        if now > self.now:
            self.now = now
        now = self.now
        if now < self.deadline and self.settings is self.judged and not self.peer_times:
            return []  # no (further) limit can have been crossed yet: the last tick found none, none came closer
        self._peer_suspects()
        stalled = {}
        for rank, r in self.ranks.items():
            found = self._stalled(r, now)
            if found is not None:
                stalled[rank] = found
        self.stalled = stalled
        if not stalled and not self.open and not self.peer_times:
            self._deadline()
        if not stalled or self.root_failed or self.oom:
            return [self._resolve(now, None, "")] if self.open else []
        signature = (frozenset((q, f[0]) for q, f in stalled.items()), frozenset(self.peer_failed))
        if self.open and signature == self.signature:
            if not self.peer_times:
                self._deadline(stalled)
            return []
        self.signature = signature
        at = now if self.open else min(f[1] for f in stalled.values())
        summary, step, data = describe(self, stalled, at)
        was = self.picture.get("root_ranks") if self.open else None
        reason = self.picture.get("reason")
        if was and not set(was) & set(data["root_ranks"]) and all(stalled.get(q, ("",))[0] != reason for q in was):
            # the root came back (a SIGSTOP'ed rank continued): the others still wait behind the step it
            # holds up, and are no new root; the picture that named it stands until they advance
            return []
        self.picture = {"summary": summary, "step": step, **data}
        event = firing(self.name, None, step, at, summary, "critical", **data)
        event.refresh = self.open
        self.open = True
        if not self.peer_times:
            self._deadline(stalled)
        return [event]

    def _deadline(self, stalled: dict[int, tuple[str, float, float]] | None = None) -> None:
        """The earliest record time at which a rank can cross a limit, from what is known now: a later record
        only moves a rank's last record and step advance later and its limits up (longer intervals learned),
        except those that set ``self.deadline`` to -inf (a new rank, a start, an end, an oom record, a first
        heartbeat or step advance, an older advance, a step going back, a retired rank speaking, and any
        record while an incident is open). A little before it, so that rounding the sum never lets a crossing
        by: the tick then judges as ever.

        With an incident open, the ranks already ``stalled`` are left out: without a record a crossed limit
        stays crossed, for the same reason (the earlier crossing), so the picture changes only when another
        rank crosses one. Until then a tick finds the same signature and says nothing: the ticks of a dead
        job's open alert (every second, on the server and after the end of a replayed recording) skip it."""
        s = self.settings
        self.judged = s
        earliest = math.inf
        if s.enabled:
            for q, r in self.ranks.items():
                if not self.finished(r) and (stalled is None or q not in stalled):
                    earliest = min(earliest, r.seen + self.silence_limit(r), r.advance_time + self.step_limit(r))
        self.deadline = earliest - DEADLINE_MARGIN

    # -- the rules ----------------------------------------------------------
    def step_limit(self, r: _Rank) -> float:
        s = self.settings
        limit = min(max(s.floor_seconds, s.factor * self.longest), s.ceiling_seconds)
        return limit if r.advanced else max(limit, s.startup_seconds)

    def silence_limit(self, r: _Rank) -> float:
        s = self.settings
        if not r.beats:
            limit = self.step_limit(r)
        else:
            limit = min(max(s.silence_floor_seconds, s.factor * self.longest_gap), s.ceiling_seconds)
        if self.suspect(r):  # quiet since before a peer's collective broke: gone, unless it speaks soon
            if self.peer_at_once:
                limit = min(limit, self.peer_cut + PEER_GRACE_SECONDS - r.seen)
            elif r.beat_gap > 0:
                limit = min(limit, max(self.peer_cut + PEER_GRACE_SECONDS - r.seen,
                                       PEER_BEATS * r.beat_gap + PEER_GRACE_SECONDS))
        return limit

    def finished(self, r: _Rank) -> bool:
        return r.ended or r.retired or (self.end_step is not None and r.step <= self.end_step)

    def typical(self) -> float | None:
        return median(self.recent) if self.recent else None

    def _peer_suspects(self) -> None:
        """After a collective error, the ranks quiet since before it are suspects (their silence is short:
        ``_stalled``); when every other rank is finished, they are the only explanation: at once."""
        if not self.peer_times:
            self.peer_cut, self.peer_at_once = -math.inf, False
            return
        cut = min(self.peer_times.values())
        self.peer_cut = cut
        self.peer_at_once = all(r.seen < cut or self.finished(r) for r in self.ranks.values())

    def suspect(self, r: _Rank) -> bool:
        """Quiet since before another rank's collective error (the first of them)."""
        return r.seen < self.peer_cut

    def _stalled(self, r: _Rank, now: float) -> tuple[str, float, float] | None:
        """(reason, crossing time, limit) of the earliest condition that holds at ``now``."""
        if not self.settings.enabled or self.finished(r):
            return None
        found = None
        silence = self.silence_limit(r)
        if now - r.seen > silence:
            found = ("silent", r.seen + silence, silence)
        limit = self.step_limit(r)
        if now - r.advance_time > limit and (found is None or r.advance_time + limit < found[1]):
            found = ("stuck", r.advance_time + limit, limit)
        return found

    def _resolve(self, time: float, rank: int | None, why: str) -> Event:
        self.open = False
        self.deadline = -math.inf
        self.signature = None
        step = self.picture.get("step", 0)
        self.picture = {}
        self.stalled = {}
        if not self.settings.enabled:
            summary = "rank_stalled was disabled"
        elif self.root_failed:
            q = min(self.root_failed)
            summary = (f"rank {q} failed ({self.root_failed[q]}): the stall is part of that incident "
                       f"(see rank_failed)")
        elif self.oom:
            summary = (f"rank {min(self.oom)} ran out of GPU memory: the stall is part of that incident "
                       f"(see gpu_oom)")
        elif rank is not None and self.finished(self.ranks[rank]) and self.end_step is not None:
            summary = f"rank {rank} {why}: the run ended at step {self.end_step}, no rank is stalled"
        else:
            who = f"rank {rank} {why}; " if rank is not None and why else ""
            s = self.settings
            limit = min(max(s.floor_seconds, s.factor * self.longest), s.ceiling_seconds)
            summary = (f"{who}no rank is stalled any more; the stall limit is now {limit:.0f} s "
                       f"(longest step interval seen {self.longest:.1f} s)")
        return resolved(self.name, None, step, time, summary)

    def facts(self) -> dict[str, Any]:
        """The open incident: its root, host and the ranks that only wait (GET /v1/runs/{run})."""
        return dict(self.picture) if self.open else {}
