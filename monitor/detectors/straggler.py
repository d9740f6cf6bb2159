"""straggler: one rank is consistently slower than its peers.

In synchronous data-parallel training every rank's step time is the same (the
fast ranks wait for the slow one in the all-reduce), so step time cannot name
the culprit. What differs is the time a rank waits for its data
(``data_time_seconds``); the time it computes (``compute_seconds``: a slow or
throttling GPU), which counts only while its peers wait for it in their
collectives (their ``comm_wait_seconds`` median at least half its excess); and,
when ranks do not synchronise every step, the time between a rank's samples (per
step, so sampling every N steps compares fairly). When the slow rank's latest
``gpu_health`` reading shows its GPU throttling, the alert says so.

For each signal and rank: the median over the rank's last ``window`` samples,
against the median of its peers' medians (leave-one-out). A rank is slow when
it is ``ratio`` x its peers and the excess is worth a page: at least
``min_excess_seconds`` and ``min_excess_fraction`` of the step time (the job
loses that much on every step). It fires once that has held for
``sustain_samples`` more samples, and resolves when it drops below
``resolve_ratio`` x its peers (or the excess under half the minimum).

Evaluated on ``tick`` (once per second of run time), so the cost per record is
an append. A tick with no sample, start or end since the one before has nothing
new to judge (the verdicts depend on nothing else) and returns at once; a rank's
median is sorted again only after its window changed; and a signal whose slowest
median is not ``ratio`` x (or not the excess above) the lowest any rank's peers
can have is settled without the per-rank comparison, except for the ranks with an
open alert or a slow streak under way.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

from ..config.rules import at_least, flag, ordered, whole
from ..events import Event, firing, resolved
from ..record import Record
from ..state import RunState
from .base import Detector
from .gpu_health import slowdown

SIGNALS = ("data_time", "compute", "step_interval")
WHAT = {"data_time": "waits for data", "compute": "computes", "step_interval": "takes per step"}
INF = math.inf
CLOCK_RATIO = 0.5  # a GPU clocked under half its maximum is said to throttle (as gpu_degraded's default)


@dataclass(kw_only=True, slots=True)
class StragglerSettings:
    enabled: bool = True
    window: int = 20  # samples per rank the medians are taken over
    ratio: float = 1.5  # slow: median >= ratio x the peers' median
    min_excess_seconds: float = 0.05  # ... and at least this much more per step
    min_excess_fraction: float = 0.1  # ... and at least this fraction of the step time
    sustain_samples: int = 10  # ... for this many further samples of the rank
    resolve_ratio: float = 1.2  # caught up: median < resolve_ratio x the peers' median

    def __post_init__(self) -> None:
        flag(self, "straggler", "enabled")
        whole(self, "straggler", "window", minimum=3)
        whole(self, "straggler", "sustain_samples", minimum=0)
        at_least(self, "straggler", 0.0, "ratio", "min_excess_seconds", "min_excess_fraction", "resolve_ratio")
        ordered(self, "straggler", "ratio", ">", 1)
        if not 1 <= self.resolve_ratio <= self.ratio:
            raise ValueError(f"straggler.resolve_ratio: must be between 1 and ratio "
                             f"({self.ratio!r}), got {self.resolve_ratio!r}")


@dataclass(slots=True)
class _Rank:
    windows: dict[str, deque[float]] = field(default_factory=dict)
    # the same windows as attributes, read per sample without a dict look-up (``_push`` sets both)
    data_time: deque[float] | None = None
    compute: deque[float] | None = None
    comm_wait: deque[float] | None = None
    step_interval: deque[float] | None = None
    samples: int = 0
    last_step: int = -1
    last_time: float = 0.0
    onset: dict[str, int] = field(default_factory=dict)  # signal -> samples count when it turned slow
    ended: bool = False
    # signal -> (its window, that window sorted, ``samples`` then): the median while no sample came since,
    # and bounds on it for a few samples more (``_quiet``)
    sorts: dict[str, tuple[deque[float], list[float], int]] = field(default_factory=dict)
    until: int = 0  # no rank can turn slow before this one's ``samples`` passes this (``_certify``)
    gpu: str | None = None  # its GPU's latest reading, when it throttles: "GPU 3 (0000:65:00.0): HW slowdown"


def _median(values: Iterable[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def _middle(s: list[float]) -> float:
    """Median of the sorted ``s`` (as ``_median``, without sorting again)."""
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def _median_without(s: list[float], i: int) -> float:
    """Median of sorted ``s`` without its element ``i`` (len(s) >= 2)."""
    k = (len(s) - 1) // 2  # the middle of the m = len(s) - 1 others; s[j] is s[j + 1] from j = i on
    hi = s[k] if k < i else s[k + 1]
    if len(s) % 2 == 0:  # m odd: one middle element
        return hi
    return ((s[k - 1] if k - 1 < i else s[k]) + hi) / 2


class Straggler(Detector[StragglerSettings]):
    name = "straggler"
    record_types = ("start", "sample", "end", "gpu_health")
    Settings = StragglerSettings

    def __init__(self, settings: StragglerSettings, run: RunState) -> None:
        super().__init__(settings, run)
        self.ranks: dict[int, _Rank] = {}
        self.step_times: deque[float] = deque(maxlen=64)  # step_time_seconds of any rank
        self.firing: dict[int, str] = {}  # rank -> signal of its open alert
        self.onsets: set[int] = set()  # ranks whose onset may hold a signal (a slow streak under way)
        self.step_time: float | None = None  # median of step_times, until one is added
        self.changed = True  # a sample, start or end since the last tick: the verdicts may differ
        self.judged: StragglerSettings | None = None  # the settings of the last tick

    # -- records ------------------------------------------------------------
    def update(self, record: Record) -> list[Event]:
        kind = record.type
        if kind == "sample":
            try:  # (cheaper than .get for every sample)
                r = self.ranks[record.rank]
            except KeyError:
                r = self.ranks[record.rank] = _Rank()
            r.samples += 1
            r.ended = False
            if r.samples > r.until:
                self.changed = True
            # each value joins its signal's window in place while that window has the settings' length (else
            # _push makes it anew: the first value, a reload)
            window = self.settings.window
            value = record.data_time_seconds
            if value is not None and 0.0 <= value < INF:  # finite, >= 0
                dq = r.data_time
                if dq is not None and dq.maxlen == window:
                    dq.append(value)
                else:
                    self._push(r, "data_time", value)
            value = record.compute_seconds
            if value is not None and 0.0 <= value < INF:
                wait = record.comm_wait_seconds
                if wait is None or not 0.0 <= wait < INF:
                    wait = 0.0
                dq, waits = r.compute, r.comm_wait
                if dq is not None and waits is not None and dq.maxlen == window == waits.maxlen:
                    dq.append(value)
                    waits.append(wait)
                else:
                    self._push(r, "compute", value)
                    self._push(r, "comm_wait", wait)
            step = record.step
            if step is not None and step > r.last_step:
                t = record.time
                if r.last_step >= 0 and t > r.last_time:
                    value = (t - r.last_time) / (step - r.last_step)
                    dq = r.step_interval
                    if dq is not None and dq.maxlen == window:
                        dq.append(value)
                    else:
                        self._push(r, "step_interval", value)
                r.last_step, r.last_time = step, t
            value = record.step_time_seconds
            if value is not None and 0.0 < value < INF:
                self.step_times.append(value)
                self.step_time = None
            return []
        if record.gpu_health is not None and record.rank in self.ranks:
            h = record.gpu_health
            slow = slowdown(h, CLOCK_RATIO)
            bus = f" ({h.pci_bus_id})" if h.pci_bus_id else ""
            self.ranks[record.rank].gpu = None if slow is None else f"GPU {h.index}{bus}: {slow}"
        if kind in ("start", "end") and record.rank in self.ranks:
            self.changed = True
            r = self.ranks[record.rank]
            if kind == "start":  # a restart: what it did before says nothing about now
                self.ranks[record.rank] = _Rank()
            else:
                r.ended = True
            if record.rank in self.firing:
                del self.firing[record.rank]
                why = "started again" if kind == "start" else "ended"
                return [resolved(self.name, record.rank, max(r.last_step, 0), record.time,
                                 f"rank {record.rank} {why}; no longer compared as a straggler")]
        return []

    def _push(self, r: _Rank, signal: str, value: float) -> None:
        window = self.settings.window
        dq = r.windows.get(signal)
        if dq is None or dq.maxlen != window:
            dq = r.windows[signal] = deque(dq or (), maxlen=window)
            setattr(r, signal, dq)
            self.changed = True  # a new window (or one resized by a reload): no bound on its median holds
        dq.append(value)

    # -- time ---------------------------------------------------------------
    def tick(self, now: float) -> list[Event]:
        s = self.settings
        if not self.changed and s is self.judged:
            return []  # nothing new since the last tick, which judged this very state: the same verdicts
        out = self._judge(now, s)
        self.changed, self.judged = False, s
        return out

    @staticmethod
    def _sorted_of(r: _Rank, signal: str, dq: deque[float]) -> list[float]:
        """The rank's window ``dq`` sorted, sorted again only when a sample came since."""
        snap = r.sorts.get(signal)
        if snap is None or snap[2] != r.samples or snap[0] is not dq:
            snap = r.sorts[signal] = (dq, sorted(dq), r.samples)
        return snap[1]

    def _median_of(self, r: _Rank, signal: str, dq: deque[float]) -> float:
        return _middle(self._sorted_of(r, signal, dq))

    def _step_time(self) -> float | None:
        if self.step_time is None and self.step_times:
            self.step_time = _median(self.step_times)
        return self.step_time

    def _judge(self, now: float, s: StragglerSettings) -> list[Event]:
        live = {q: r for q, r in self.ranks.items() if not r.ended}
        if len(live) < 2 or not s.enabled:
            self._certify(live, 0)
            return self._resolve_all(now, "straggler was disabled") if not s.enabled else []
        firing, window = self.firing, s.window
        if not firing and not self.onsets:
            for r in live.values():  # every median exact now: the bounds start from it
                for signal in SIGNALS:
                    dq = r.windows.get(signal)
                    if dq is not None and len(dq) >= window:
                        self._sorted_of(r, signal, dq)
            # no rank is slow, nor can be for ``more`` samples more (the most the bounds reach first, then fewer):
            # until then the ticks have nothing to judge
            more = window // 2 - 1
            while more > 0 and not all(self._quiet(s, signal, live, more, True) for signal in SIGNALS):
                more //= 2
            if more > 0 or all(self._quiet(s, signal, live, 0, True) for signal in SIGNALS):
                self._certify(live, more)
                return []
        self._certify(live, 0)
        verdicts: dict[int, tuple[str, float, float]] = {}  # rank -> (signal, median, peers)
        holding: set[int] = set()
        for signal in SIGNALS:
            if not firing and not self.onsets and self._quiet(s, signal, live):
                continue  # no rank can be slow on this signal, and none has an alert or a streak to update
            meds: dict[int, float] = {}
            for q, r in live.items():
                dq = r.windows.get(signal)
                if dq is not None and len(dq) >= window:
                    meds[q] = self._median_of(r, signal, dq)
            if len(meds) < 2:
                continue
            ordered = sorted(meds.values())
            middle = _middle(ordered)
            need = -1.0  # computed when first needed (it reads the median step time)
            # the lowest median any rank's peers have (the others' without the slowest): when the slowest is
            # not slow against it, no rank is, and only the ranks with an alert or a streak need a look
            top, low = ordered[-1], _median_without(ordered, len(ordered) - 1)
            quiet = top < s.ratio * low
            if not quiet:
                need = self._need(s, signal, middle)
                quiet = top - low < need
            if quiet:
                watch = self.onsets
                if not firing and not watch:
                    continue
                todo = [q for q in meds if q in firing or (q in watch and signal in live[q].onset)]
            else:
                todo = list(meds)
            for q in todo:
                m = meds[q]
                if m < middle and q not in firing:
                    # below the middle: its peers' median is above it, so it is not slow (most ranks)
                    onset = live[q].onset
                    if onset:
                        onset.pop(signal, None)
                    continue
                if need < 0:
                    need = self._need(s, signal, middle)
                peers = _median_without(ordered, bisect_left(ordered, m))
                r = live[q]
                slow = m >= s.ratio * peers and m - peers >= need
                if slow and signal == "compute":
                    slow = self._peers_wait(live, q) >= (m - peers) / 2  # they wait for it
                if q in firing:
                    if m >= s.resolve_ratio * peers and m - peers >= need / 2:
                        holding.add(q)
                    continue
                if not slow:
                    r.onset.pop(signal, None)
                    continue
                start = r.onset.setdefault(signal, r.samples)
                self.onsets.add(q)
                if r.samples - start >= s.sustain_samples and q not in verdicts:
                    verdicts[q] = (signal, m, peers)
        if self.onsets:
            self.onsets = {q for q in self.onsets if q in self.ranks and self.ranks[q].onset}
        out = []
        for q, (signal, m, peers) in sorted(verdicts.items()):
            out.append(self._fire(q, live[q], signal, m, peers, now, self._step_time()))
        for q in [q for q in firing if q in live and q not in holding and q not in verdicts]:
            signal = firing.pop(q)
            r = live[q]
            m = _median(r.windows[signal])
            out.append(resolved(self.name, q, max(r.last_step, 0), now,
                                f"rank {q} caught up: it now {WHAT[signal]} {m:.3f} s (median)",
                                signal=signal, median_seconds=m))
            r.onset.clear()
        return out

    def _certify(self, live: dict[int, _Rank], more: int) -> None:
        """The next ``more`` samples of each live rank cannot make any rank slow: no tick need judge them.
        Fewer for a rank whose window of a signal fills up before (it joins the comparison); none for a rank
        that is not live (its next sample makes it live)."""
        window = self.settings.window
        for q, r in self.ranks.items():
            room = more
            if room and q in live:
                for signal in SIGNALS:
                    dq = r.windows.get(signal)
                    if dq is None:
                        room = min(room, window - 1)
                    elif len(dq) < window:
                        room = min(room, window - 1 - len(dq))
            else:
                room = 0
            r.until = r.samples + room

    def _quiet(self, s: StragglerSettings, signal: str, live: dict[int, _Rank], more: int = 0,
               fixed: bool = False) -> bool:
        """True when no rank can be slow on ``signal``, judged from bounds on the ranks' medians without sorting
        a window: a median sorted ``j`` samples ago (full window of n, sorted S) is now between S[k - j] and
        S[k + j] for each middle index k (j values left and j came). The slowest median is at most the highest
        upper bound, and the lowest peers' median (without the slowest) at least that of the lower bounds:
        when those are not ``ratio`` apart (or the excess is under the one worth a page), no rank is slow. False
        (judge exactly) when a bound is unknown or too loose; then the windows are sorted again.

        ``more``: after that many more samples of every rank. ``fixed``: judged with the least excess worth a
        page (``min_excess_seconds``), not the one from the median step time, which moves with every sample."""
        window = s.window
        lows: list[float] = []
        top = -math.inf
        for r in live.values():
            dq = r.windows.get(signal)
            if dq is None or len(dq) < window:
                continue
            snap = r.sorts.get(signal)
            if snap is None or snap[0] is not dq:
                return False
            ordered = snap[1]
            n = len(ordered)
            j = r.samples - snap[2] + more
            k = n // 2
            if n != dq.maxlen or k - 1 - j < 0 or k + j >= n:
                return False  # sorted before the window was full, or too long ago: bounds unknown
            if n % 2:
                lo, hi = ordered[k - j], ordered[k + j]
            else:
                lo, hi = (ordered[k - 1 - j] + ordered[k - j]) / 2, (ordered[k - 1 + j] + ordered[k + j]) / 2
            lows.append(lo)
            if hi > top:
                top = hi
        if len(lows) < 2:
            return True  # fewer than two ranks to compare: nothing to judge (as _judge finds)
        lows.sort()
        low = _median_without(lows, len(lows) - 1)
        if top < s.ratio * low:
            return True
        if fixed:
            return top - low < s.min_excess_seconds
        # the excess worth a page grows with the middle (step_interval without step times): its lower bound
        return top - low < self._need(s, signal, _middle(lows))

    def _need(self, s: StragglerSettings, signal: str, middle: float) -> float:
        """The excess over the peers worth a page: at least min_excess_seconds and min_excess_fraction of the
        step time (the median step time, else for step_interval the signal's middle)."""
        base = self._step_time()
        if base is None and signal == "step_interval":
            base = middle
        return max(s.min_excess_seconds, s.min_excess_fraction * base) if base else s.min_excess_seconds

    def _peers_wait(self, live: dict[int, _Rank], rank: int) -> float:
        """The median of the other ranks' median collective wait (0 without any)."""
        waits = [self._median_of(r, "comm_wait", dq) for q, r in live.items()
                 if q != rank and (dq := r.windows.get("comm_wait")) is not None and dq]
        return _median(waits) if waits else 0.0

    def _fire(self, rank: int, r: _Rank, signal: str, m: float, peers: float, now: float,
              step_time: float | None) -> Event:
        self.firing[rank] = signal
        times = f"{m / peers:.1f}x" if peers > 0 else "far more than"
        waits = self._peers_wait({q: x for q, x in self.ranks.items() if not x.ended}, rank)
        summary = (f"rank {rank} is a straggler: it {WHAT[signal]} {m:.3f} s (median of its last "
                   f"{self.settings.window} samples), {times} its peers' {peers:.3f} s")
        if signal == "compute":
            summary += f", while they wait {waits:.3f} s per step in their collectives"
        summary += f"; the job loses about {m - peers:.3f} s per step waiting for it"
        if signal == "data_time":
            summary += " (check its data loader workers, disk or CPU)"
        host = self.run.ranks[rank].host if rank in self.run.ranks else None
        if r.gpu is not None:
            summary += f"; its GPU is throttling: {host + ' ' if host else ''}{r.gpu}"
        elif signal == "compute":
            summary += " (a slow GPU or CPU, or more work on that rank)"
        return firing(self.name, rank, max(r.last_step, 0), now, summary, "warning",
                      signal=signal, median_seconds=m, peers_median_seconds=peers,
                      ratio=(m / peers if peers > 0 else None), excess_seconds=m - peers,
                      step_time_seconds=step_time, window=self.settings.window,
                      peers_comm_wait_seconds=waits if signal == "compute" else None,
                      gpu_throttling=r.gpu)

    def _resolve_all(self, now: float, why: str) -> list[Event]:
        out = [resolved(self.name, q, max(self.ranks[q].last_step, 0), now, f"rank {q}: {why}")
               for q in self.firing]
        self.firing.clear()
        return out
