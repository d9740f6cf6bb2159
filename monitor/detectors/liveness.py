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

An alert's ``time`` is the moment the limit was crossed (last advance + limit),
so the server (timer ticks on the wall clock) and replay (ticks on record time)
report the same alert. When several ranks are stalled, each alert names the
rank that most likely stopped first: a rank that went silent while others
still send heartbeats, else the one left behind at the lowest step, else
(all ranks at one step) the one whose heartbeats say it has been waiting for
data (``phase`` "data") the longest while the others got their batch and wait
in the step's collectives: a hung DataLoader. Without ``phase`` in the
records the blocker at one step cannot be told, and the summary says so.

A rank that sent ``end`` is finished, not dead, and so is every rank that has
not gone past the step at which another rank ended (in synchronous training
nobody ends while others still train). A new ``start`` or a step advance
resolves an open alert; so does ``end``.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import deque
from dataclasses import dataclass
from statistics import median

from ..events import Event, firing, resolved
from ..record import Record
from .base import Detector
from .validate import flag

RECENT_INTERVALS = 64  # step intervals kept for the "typical" figure in summaries
NAMES_SHOWN = 10  # ranks named in a summary; the rest are counted


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
        for key in ("floor_seconds", "factor", "ceiling_seconds", "startup_seconds",
                    "silence_floor_seconds"):
            value = getattr(self, key)
            if (not isinstance(value, (int, float)) or isinstance(value, bool)
                    or not math.isfinite(value) or value <= 0):
                raise ValueError(f"rank_stalled.{key}: must be a positive number, got {value!r}")
        if self.factor < 1:
            raise ValueError(f"rank_stalled.factor: must be >= 1, got {self.factor!r}")
        if self.ceiling_seconds < self.floor_seconds:
            raise ValueError(f"rank_stalled.ceiling_seconds: must be >= floor_seconds "
                             f"({self.floor_seconds!r}), got {self.ceiling_seconds!r}")


@dataclass(slots=True)
class _Peers:
    """The live ranks, indexed once per tick: naming the first rank costs O(log n) per alert, so a
    whole large job stalling at once does not hold the event loop for n x n."""

    live: int
    by_silence: list[tuple[float, list[tuple[float, int]]]]  # (silence limit, sorted [(seen, rank)])
    order: list[tuple[int, float, int]]  # sorted (shown step, advance time, rank)
    data: list[tuple[float, int]]  # ranks waiting for data: sorted (phase start or inf if unknown, rank)


@dataclass(slots=True)
class _Rank:
    advance_time: float  # when step last advanced (or the baseline: start / first record)
    seen: float  # newest record time
    step: int = -1  # -1: no step known since the last start
    shown: int = 0  # the last step it reported (kept across a start), for alerts
    sample_step: int = -1  # highest step of its samples (the training thread's own order)
    advanced: bool = False  # step advanced since the baseline
    beats: bool = False  # sends heartbeats
    ended: bool = False
    retired: bool = False  # a later start has a world_size that no longer includes it
    after_start: bool = True  # the previous record was a start (its gap is start-up, not learned)
    phase: str | None = None  # what its training thread does, as its newest heartbeat or sample says
    phase_time: float | None = None  # when that phase began
    phase_seen: float = -math.inf  # time of the record that said so


class RankStalled(Detector):
    name = "rank_stalled"
    Settings = RankStalledSettings

    def __init__(self, settings: RankStalledSettings, run) -> None:  # type: ignore[no-untyped-def]
        super().__init__(settings, run)
        self.ranks: dict[int, _Rank] = {}
        self.now = -math.inf
        self.longest = 0.0  # longest interval between two step advances of one rank
        self.recent: deque[float] = deque(maxlen=RECENT_INTERVALS)
        self.longest_gap = 0.0  # longest gap between two records of a heartbeating rank
        self.end_step: int | None = None  # highest step at which a rank sent `end`
        self.end_time = -math.inf
        self.firing: dict[int, str] = {}  # rank -> reason of its open alert

    # -- records ------------------------------------------------------------
    def update(self, record: Record) -> list[Event]:
        t = record.time
        if t > self.now:
            self.now = t
        kind = record.type
        r = self.ranks.get(record.rank)
        if r is None:
            r = self.ranks[record.rank] = _Rank(advance_time=t, seen=t)
        elif t > r.seen:
            if r.beats and not r.after_start and t - r.seen > self.longest_gap:
                self.longest_gap = t - r.seen
            r.seen = t
        r.retired = False
        r.after_start = kind == "start"
        why = ""
        if kind in ("heartbeat", "sample") and t >= r.phase_seen:
            r.phase_seen, r.phase = t, record.phase
            r.phase_time = record.phase_time if record.phase is not None else None
        if kind == "start":
            r.advance_time, r.step, r.advanced, r.beats, r.ended = t, -1, False, False, False
            r.sample_step, r.phase, r.phase_time = -1, None, None
            why = "started again"
            if t > self.end_time:
                self.end_step = None
            if record.world_size:
                self._retire_beyond(record.world_size, t)
        elif kind == "end":
            r.ended = True
            # a rank that failed (an exception quoted) does not end the job for the others: a peer
            # that went silent before it may be the root cause, and stays judged
            if record.status != "failed" and record.step is not None and (
                    self.end_step is None or record.step > self.end_step):
                self.end_step = record.step
            self.end_time = max(self.end_time, t)
            why = "ended"
        else:
            if kind == "heartbeat":
                r.beats = True
            step = record.step
            if step is not None:
                if r.step < 0:  # baseline after a start or at first sight: not progress yet
                    r.step = step
                elif step > r.step:
                    if r.advanced:
                        interval = t - r.advance_time
                        if interval > 0:
                            self.recent.append(interval)
                            if interval > self.longest:
                                self.longest = interval
                    r.step, r.advance_time, r.advanced, r.ended = step, t, True, False
                    why = f"advanced to step {step}"
                elif kind == "sample" and step < r.sample_step and t > r.advance_time:
                    # its training thread went back: restarted without a start record. (A heartbeat
                    # may carry an older step than the sample before it: the threads race.)
                    r.step, r.advance_time, r.advanced, r.sample_step = step, t, False, step
                    why = f"restarted at step {step}"
                if kind == "sample" and step > r.sample_step:
                    r.sample_step = step
                r.shown = r.step
        if not self.firing:
            return []
        check = list(self.firing) if kind in ("start", "end") else (
            [record.rank] if record.rank in self.firing else [])
        out = []
        for rank in check:
            event = self._resolve_if_ok(rank, self.now, t, why if rank == record.rank else "")
            if event is not None:
                out.append(event)
        return out

    def _retire_beyond(self, world_size: int, t: float) -> None:
        for rank, r in self.ranks.items():
            if rank >= world_size and r.seen < t:
                r.retired = True

    # -- time ---------------------------------------------------------------
    def tick(self, now: float) -> list[Event]:
        if now > self.now:
            self.now = now
        now = self.now
        out = []
        peers = None  # built at the first alert of this tick
        for rank, r in self.ranks.items():
            prev = self.firing.get(rank)
            if prev is not None:
                event = self._resolve_if_ok(rank, now, now, "")
                if event is not None:
                    out.append(event)
                continue
            found = self._stalled(r, now)
            if found is not None:
                peers = peers or self._peers()
                out.append(self._fire(rank, r, *found, peers))
        return out

    # -- the rules ----------------------------------------------------------
    def step_limit(self, r: _Rank) -> float:
        s = self.settings
        limit = min(max(s.floor_seconds, s.factor * self.longest), s.ceiling_seconds)
        return limit if r.advanced else max(limit, s.startup_seconds)

    def silence_limit(self, r: _Rank) -> float:
        s = self.settings
        if not r.beats:
            return self.step_limit(r)
        return min(max(s.silence_floor_seconds, s.factor * self.longest_gap), s.ceiling_seconds)

    def finished(self, r: _Rank) -> bool:
        return r.ended or r.retired or (self.end_step is not None and r.step <= self.end_step)

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

    def _resolve_if_ok(self, rank: int, now: float, time: float, why: str) -> Event | None:
        r = self.ranks[rank]
        if self._stalled(r, now) is not None:
            return None
        reason = self.firing.pop(rank)
        limit = self.step_limit(r)
        if not self.settings.enabled:
            summary = f"rank {rank}: rank_stalled was disabled"
        elif self.finished(r):
            summary = f"rank {rank} {why}" if why else (
                f"rank {rank} is finished: a rank ended the run at step {self.end_step}")
        else:
            if not why:
                why = ("sends records again" if reason == "silent"
                       else "is within the stall limit again")
            summary = (f"rank {rank} {why}; the stall limit is now {limit:.0f} s "
                       f"(longest step interval seen {self.longest:.1f} s)")
        return resolved(self.name, rank, r.shown, time, summary, threshold_seconds=limit)

    def _fire(self, rank: int, r: _Rank, reason: str, at: float, limit: float, peers: _Peers) -> Event:
        self.firing[rank] = reason
        step = r.shown
        if reason == "silent":
            what = (f"rank {rank} went silent after step {step}: no heartbeat or record for "
                    f"{limit:.0f} s (process gone or frozen)")
        else:
            beat = "while its heartbeats continue" if r.beats else "while it still sends records"
            what = (f"rank {rank} is stuck after step {step}: no step finished for {limit:.0f} s "
                    f"{beat} (blocked in a collective or in data loading)")
        if reason == "silent" and r.beats:
            basis = (f"limit {limit:.0f} s = max(floor {self.settings.silence_floor_seconds:.0f} s, "
                     f"{self.settings.factor:g}x the longest record gap seen, {self.longest_gap:.1f} s)")
        elif r.advanced:
            basis = (f"limit {limit:.0f} s = max(floor {self.settings.floor_seconds:.0f} s, "
                     f"{self.settings.factor:g}x the longest step interval seen, {self.longest:.1f} s)")
        else:
            basis = f"limit {limit:.0f} s: no step finished since it started"
        first, why_first = self._first(at, peers)
        summary = f"{what}; {why_first}; {basis}" if why_first else f"{what}; {basis}"
        typical = median(self.recent) if self.recent else None
        return firing(self.name, rank, step, at, summary, "critical",
                      reason=reason, threshold_seconds=limit, last_step_time=r.advance_time,
                      last_record_time=r.seen, longest_step_interval_seconds=self.longest,
                      typical_step_interval_seconds=typical, heartbeats=r.beats,
                      first_rank=first, phase=r.phase, phase_time=r.phase_time)

    def _peers(self) -> _Peers:
        live = [(q, r) for q, r in self.ranks.items() if not self.finished(r)]
        by_limit: dict[float, list[tuple[float, int]]] = {}
        for q, r in live:
            by_limit.setdefault(self.silence_limit(r), []).append((r.seen, q))
        return _Peers(len(live), [(lim, sorted(v)) for lim, v in by_limit.items()],
                      sorted((r.shown, r.advance_time, q) for q, r in live),
                      sorted((r.phase_time if r.phase_time is not None else math.inf, q)
                             for q, r in live if r.phase == "data"))

    def _first(self, at: float, peers: _Peers) -> tuple[int | None, str]:
        """Which rank most likely stopped first, judged at time ``at``, and why."""
        if peers.live < 2:
            return None, ""
        # quiet for half its silence limit: on its way to silent (ranks stop within ms of each other)
        n_missing, earliest, latest = 0, None, -math.inf
        for lim, seen in peers.by_silence:
            k = bisect_right(seen, (at - lim / 2, math.inf))
            if k:
                n_missing += k
                earliest = seen[0] if earliest is None else min(earliest, seen[0])
                latest = max(latest, seen[k - 1][0])
        if earliest is not None and n_missing < peers.live:
            seen_at, q = earliest
            n = peers.live - n_missing
            return q, (f"rank {q} went silent first (nothing for {at - seen_at:.0f} s) while "
                       f"{_ranks(n)} still send{'s' if n == 1 else ''} records")
        prefix = ""
        if earliest is not None:  # all went quiet together: killed, node down, or the recording ended
            prefix = f"every rank went silent within {latest - earliest[0]:.1f} s; "
        order = peers.order
        low_step, _, q = order[0]
        n_behind = bisect_right(order, (low_step, math.inf, math.inf))
        top = order[-1][0]
        if n_behind == 1:
            return q, (f"{prefix}rank {q} stopped first (at step {low_step}; "
                       f"{_ranks(peers.live - 1)} reached {top})")
        if n_behind == peers.live:
            waiting = _waiting_for_data(peers, at, low_step, prefix)
            if waiting is not None:
                return waiting
            return None, (f"{prefix}all {peers.live} ranks stand at step {low_step}: the rank that "
                          f"blocks the others cannot be told from steps (dump their stacks, "
                          f"e.g. py-spy dump)")
        names = ", ".join(str(x[2]) for x in order[:min(n_behind, NAMES_SHOWN)])
        if n_behind > NAMES_SHOWN:
            names += f" and {n_behind - NAMES_SHOWN} more"
        return None, f"{prefix}ranks {names} are behind at step {low_step} while others reached {top}"


def _waiting_for_data(peers: _Peers, at: float, step: int, prefix: str) -> tuple[int | None, str] | None:
    """All ranks stand at ``step``: the ranks whose training thread waits for its next batch block the
    others, which got theirs and wait in the step's all-reduce. None without phase information."""
    data = peers.data
    if not data:
        return None
    since, q = data[0]
    since = min(since, at)
    if len(data) == peers.live:
        return None, (f"{prefix}all {peers.live} ranks have been waiting for data since step {step} (rank {q} "
                      f"for {at - since:.0f} s): check the shared storage or input pipeline")
    n = peers.live - len(data)
    if len(data) == 1:
        who, their = f"rank {q} has been waiting for data for {at - since:.0f} s", "its"
    else:
        shown = sorted(x[1] for x in data[:NAMES_SHOWN])
        names = ", ".join(map(str, shown)) + (f" and {len(data) - NAMES_SHOWN} more" if len(data) > NAMES_SHOWN else "")
        who, their = f"ranks {names} have been waiting for data (rank {q} for {at - since:.0f} s)", "their"
    return q, (f"{prefix}{who} since step {step} while {_ranks(n)} wait{'s' if n == 1 else ''} in the "
               f"step's collectives: check {their} DataLoader/storage; py-spy dump {their} workers")


def _ranks(n: int) -> str:
    return "the other rank" if n == 1 else f"the other {n} ranks"
