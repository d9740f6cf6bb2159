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
an append; a tick costs O(ranks x window).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from math import isfinite
from typing import Iterable

from ..config.rules import at_least, flag, whole
from ..events import Event, firing, resolved
from ..record import Record
from ..state import RunState
from .base import Detector
from .gpu_health import slowdown

SIGNALS = ("data_time", "compute", "step_interval")
WHAT = {"data_time": "waits for data", "compute": "computes", "step_interval": "takes per step"}
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
        if self.ratio <= 1:
            raise ValueError(f"straggler.ratio: must be > 1, got {self.ratio!r}")
        if not 1 <= self.resolve_ratio <= self.ratio:
            raise ValueError(f"straggler.resolve_ratio: must be between 1 and ratio "
                             f"({self.ratio!r}), got {self.resolve_ratio!r}")


@dataclass(slots=True)
class _Rank:
    windows: dict[str, deque[float]] = field(default_factory=dict)
    samples: int = 0
    last_step: int = -1
    last_time: float = 0.0
    onset: dict[str, int] = field(default_factory=dict)  # signal -> samples count when it turned slow
    ended: bool = False
    gpu: str | None = None  # its GPU's latest reading, when it throttles: "GPU 3 (0000:65:00.0): HW slowdown"


def _median(values: Iterable[float]) -> float:
    s = sorted(values)
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
    Settings = StragglerSettings

    def __init__(self, settings: StragglerSettings, run: RunState) -> None:
        super().__init__(settings, run)
        self.ranks: dict[int, _Rank] = {}
        self.step_times: deque[float] = deque(maxlen=64)  # step_time_seconds of any rank
        self.firing: dict[int, str] = {}  # rank -> signal of its open alert

    # -- records ------------------------------------------------------------
    def update(self, record: Record) -> list[Event]:
        kind = record.type
        if kind == "sample":
            r = self.ranks.get(record.rank)
            if r is None:
                r = self.ranks[record.rank] = _Rank()
            r.samples += 1
            r.ended = False
            value = record.data_time_seconds
            if value is not None and isfinite(value) and value >= 0:
                dq = r.windows.get("data_time")
                if dq is not None and dq.maxlen == self.settings.window:
                    dq.append(value)
                else:
                    self._push(r, "data_time", value)
            value = record.compute_seconds
            if value is not None and isfinite(value) and value >= 0:
                self._push(r, "compute", value)
                wait = record.comm_wait_seconds
                self._push(r, "comm_wait", wait if wait is not None and isfinite(wait) and wait >= 0 else 0.0)
            step = record.step
            if step is not None and step > r.last_step:
                if r.last_step >= 0 and record.time > r.last_time:
                    self._push(r, "step_interval", (record.time - r.last_time) / (step - r.last_step))
                r.last_step, r.last_time = step, record.time
            value = record.step_time_seconds
            if value is not None and isfinite(value) and value > 0:
                self.step_times.append(value)
            return []
        if record.gpu_health is not None and record.rank in self.ranks:
            h = record.gpu_health
            slow = slowdown(h, CLOCK_RATIO)
            bus = f" ({h.pci_bus_id})" if h.pci_bus_id else ""
            self.ranks[record.rank].gpu = None if slow is None else f"GPU {h.index}{bus}: {slow}"
        if kind in ("start", "end") and record.rank in self.ranks:
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
        dq.append(value)

    # -- time ---------------------------------------------------------------
    def tick(self, now: float) -> list[Event]:
        s = self.settings
        live = {q: r for q, r in self.ranks.items() if not r.ended}
        if len(live) < 2 or not s.enabled:
            return self._resolve_all(now, "straggler was disabled") if not s.enabled else []
        step_time = _median(self.step_times) if self.step_times else None
        verdicts: dict[int, tuple[str, float, float]] = {}  # rank -> (signal, median, peers)
        holding: set[int] = set()
        for signal in SIGNALS:
            meds = {q: _median(dq) for q, r in live.items()
                    if (dq := r.windows.get(signal)) is not None and len(dq) >= s.window}
            if len(meds) < 2:
                continue
            ordered = sorted(meds.values())
            index: dict[float, int] = {}
            for i, v in enumerate(ordered):
                index.setdefault(v, i)
            middle = _median(ordered)
            base = step_time
            if base is None and signal == "step_interval":
                base = middle
            need = max(s.min_excess_seconds, s.min_excess_fraction * base) if base else s.min_excess_seconds
            for q, m in meds.items():
                if m < middle and q not in self.firing:
                    # below the middle: its peers' median is above it, so it is not slow (most ranks)
                    onset = live[q].onset
                    if onset:
                        onset.pop(signal, None)
                    continue
                peers = _median_without(ordered, index[m])
                r = live[q]
                slow = m >= s.ratio * peers and m - peers >= need
                if slow and signal == "compute":
                    slow = self._peers_wait(live, q) >= (m - peers) / 2  # they wait for it
                if q in self.firing:
                    if m >= s.resolve_ratio * peers and m - peers >= need / 2:
                        holding.add(q)
                    continue
                if not slow:
                    r.onset.pop(signal, None)
                    continue
                start = r.onset.setdefault(signal, r.samples)
                if r.samples - start >= s.sustain_samples and q not in verdicts:
                    verdicts[q] = (signal, m, peers)
        out = []
        for q, (signal, m, peers) in sorted(verdicts.items()):
            out.append(self._fire(q, live[q], signal, m, peers, now, step_time))
        for q in [q for q in self.firing if q in live and q not in holding and q not in verdicts]:
            signal = self.firing.pop(q)
            r = live[q]
            m = _median(r.windows[signal])
            out.append(resolved(self.name, q, max(r.last_step, 0), now,
                                f"rank {q} caught up: it now {WHAT[signal]} {m:.3f} s (median)",
                                signal=signal, median_seconds=m))
            r.onset.clear()
        return out

    def _peers_wait(self, live: dict[int, _Rank], rank: int) -> float:
        """The median of the other ranks' median collective wait (0 without any)."""
        waits = [_median(dq) for q, r in live.items()
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
