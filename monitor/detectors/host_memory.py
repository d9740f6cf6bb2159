"""host_memory_leak: host memory that grows steadily, per rank and per machine.

Per rank, ``host_mem_bytes`` (PSS of the process and its DataLoader workers)
is summarised as per-minute minima in a fixed-size ring. The trend is judged
on the *floor* (the lowest minute over a trailing span) with Theil-Sen, over
lookbacks that double from ``min_window_seconds`` to ``window_seconds``:

- noise and GC cycles: the minimum of a minute, and the floor, do not follow them;
- DataLoader sawtooths: once memory has fallen back (by at least half of what it
  gained) the floor span grows to 1.25x the sawtooth's period, so the floor is
  the trough, which stays level unless there is a leak underneath;
- warmup growth: the first ``warmup_seconds`` are not judged, and growth that
  saturates fails the deceleration check (the recent half of a lookback must
  rise at least ``decel_ratio`` times as much as the older half);
- one allocation that stays is a single step: Theil-Sen calls it flat. A
  staircase (a step up every epoch) needs about three steps in a lookback.

The machine-level check watches ``host_mem_available_bytes`` (its per-minute
maxima, through the same machinery on the negated series) and fires when the
trend forecasts it to reach zero within ``machine_horizon_hours``. It is the
same alert name with ``rank = null`` and ``scope = "machine"``: one open
machine alert per run, naming the machine with the nearest exhaustion. Ranks
are grouped into machines by the ``host`` of their start record; ranks with no
host are taken to share one machine (the per-node sidecar).

Alerts resolve when the trend flattens: the floor's rate over the last
``window_seconds / 2`` is below half of ``min_rate_mb_per_hour`` and its rate
over the whole window below ``min_rate_mb_per_hour`` (two conditions, so that a
slow leak under noise does not flap); when memory falls back like a sawtooth;
and when the rank restarts or ends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import median

from ..events import Event, Severity, firing, resolved
from ..record import Record
from ..state import RunState
from .base import Detector
from .trend import DropWatch, Growth, MinBuckets, rolling_floor, steady_growth, theil_sen
from .validate import flag, fraction, positive

MB = 1e6
HOUR = 3600.0
JITTER_BUCKETS = 31  # recent buckets from which the noise of the minima is estimated
NOISE_RISE = 6.0  # a rise must also exceed this many sigma of that noise (~2.5 sigma of the samples)
NOISE_DROP = 8.0  # and a sawtooth's fall this many


def jitter(values: list[float]) -> float:
    """Robust standard deviation of the noise of a series (MAD of its centred differences)."""
    if len(values) < 3:
        return 0.0
    diffs = [values[i + 1] - values[i] for i in range(len(values) - 1)]
    mid = median(diffs)
    return 1.4826 * median(abs(d - mid) for d in diffs) / math.sqrt(2)


@dataclass(kw_only=True, slots=True)
class HostMemoryLeakSettings:
    enabled: bool = True
    bucket_seconds: float = 60.0  # one minimum per bucket is all that is kept
    window_seconds: float = 7200.0  # the longest lookback: slow leaks are judged over it
    min_window_seconds: float = 1800.0  # the shortest lookback: fast leaks are caught over it
    floor_seconds: float = 300.0  # trailing span of the floor (longer when a sawtooth is seen)
    warmup_seconds: float = 900.0  # growth in a process's first minutes is not judged
    min_rate_mb_per_hour: float = 100.0  # slower growth is not reported
    min_growth_mb: float = 256.0  # the floor must rise this much over a lookback (noise guard)
    sawtooth_drop_mb: float = 128.0  # a fall this big (and 8 sigma of the noise, and half the
    # gain since the last low) is a sawtooth: the floor span then covers its period
    balance: float = 0.5  # both halves of a lookback must rise, the smaller >= balance x the larger
    critical_hours: float = 2.0  # severity critical when memory runs out sooner than this
    machine_horizon_hours: float = 6.0  # machine alert when available memory runs out sooner

    def __post_init__(self) -> None:
        section = "detectors.host_memory_leak"
        flag(self, section, "enabled")
        positive(self, section, "bucket_seconds", "window_seconds", "min_window_seconds",
                 "floor_seconds", "warmup_seconds", "min_rate_mb_per_hour", "min_growth_mb",
                 "sawtooth_drop_mb", "critical_hours", "machine_horizon_hours")
        fraction(self, section, "balance")
        if self.window_seconds < 4 * self.bucket_seconds:
            raise ValueError(f"{section}.window_seconds: must be >= 4 x bucket_seconds "
                             f"({4 * self.bucket_seconds}), got {self.window_seconds!r}")
        if self.min_window_seconds > self.window_seconds:
            raise ValueError(f"{section}.min_window_seconds: must be <= window_seconds "
                             f"({self.window_seconds}), got {self.min_window_seconds!r}")


class _Series:
    """One watched series: per-bucket minima, sawtooth drops, alert state. Bounded."""

    __slots__ = ("buckets", "drops", "first_time", "growth")

    def __init__(self, s: HostMemoryLeakSettings, t: float) -> None:
        size = math.ceil(2 * s.window_seconds / s.bucket_seconds) + 2  # window + longest floor span
        self.buckets = MinBuckets(s.bucket_seconds, size)
        self.drops = DropWatch()
        self.first_time = t
        self.growth: Growth | None = None  # set while the alert is open

    def add(self, t: float, v: float, s: HostMemoryLeakSettings) -> bool:
        """Fold a sample in; True when a bucket closed (time to judge)."""
        if not self.buckets.add(t, v):
            return False
        bucket_time, low = self.buckets.ring.last()
        if bucket_time >= self.first_time + s.warmup_seconds:  # warmup growth is no sawtooth
            min_drop = max(s.sawtooth_drop_mb * MB, NOISE_DROP * self.noise())
            self.drops.add(bucket_time, low, min_drop)
        return True

    def floors(self, s: HostMemoryLeakSettings, now: float) -> list[tuple[float, float]]:
        period = self.drops.period(now, forget_after=s.window_seconds)
        span = min(max(s.floor_seconds, 1.25 * period), s.window_seconds)
        since = max(self.first_time + s.warmup_seconds, now - s.window_seconds - span)
        floors = rolling_floor(self.buckets.ring.items(since), span)
        return [p for p in floors if p[0] >= max(since + span, now - s.window_seconds)]

    def judge(self, s: HostMemoryLeakSettings, now: float) -> Growth | None:
        """The new Growth if the alert should be open after this bucket, else None."""
        floors = self.floors(s, now)
        min_rate = s.min_rate_mb_per_hour * MB / HOUR
        if self.growth is not None:  # open: stays open until the trend flattens
            pts = [p for p in floors if p[0] >= now - s.window_seconds / 2]
            if len(pts) < 3:  # a sawtooth just showed itself: the floor starts over
                return None
            rate = theil_sen([p[0] for p in pts], [p[1] for p in pts])
            if rate < 0.5 * min_rate and theil_sen([p[0] for p in floors],
                                                   [p[1] for p in floors]) < min_rate:
                return None  # flat over the last half window, and slow over the whole
            found = self._steady(s, floors, self.noise())
            return found or Growth(rate, self.growth.rise, self.growth.lookback, pts[-1][1])
        return self._steady(s, floors, self.noise())

    def noise(self) -> float:
        """Robust standard deviation of the recent bucket minima around their trend."""
        return jitter(self.buckets.ring.tail(JITTER_BUCKETS))

    @staticmethod
    def _steady(s: HostMemoryLeakSettings, floors: list[tuple[float, float]],
                noise: float) -> Growth | None:
        if not floors or floors[-1][0] - floors[0][0] < s.min_window_seconds:
            return None
        lookbacks = [s.min_window_seconds]
        while lookbacks[-1] < s.window_seconds:
            lookbacks.append(min(2 * lookbacks[-1], s.window_seconds))
        return steady_growth(floors, lookbacks, min_rate=s.min_rate_mb_per_hour * MB / HOUR,
                             min_rise=max(s.min_growth_mb * MB, NOISE_RISE * noise),
                             balance=s.balance)


class HostMemoryLeak(Detector[HostMemoryLeakSettings]):
    name = "host_memory_leak"
    Settings = HostMemoryLeakSettings

    def __init__(self, settings: HostMemoryLeakSettings, run: RunState) -> None:
        super().__init__(settings, run)
        self.ranks: dict[int, _Series] = {}
        self.machines: dict[str, _Series] = {}  # negated available memory, by host
        self.machine_open: str | None = None  # host named by the open machine alert

    def update(self, rec: Record) -> list[Event]:
        s: HostMemoryLeakSettings = self.settings
        if not s.enabled:
            return []
        if rec.type in ("start", "end"):
            return self._restart(rec)
        if rec.type != "sample":
            return []
        events: list[Event] = []
        value = rec.host_mem_bytes
        if value is not None and math.isfinite(value) and value >= 0:
            series = self._series(self.ranks, rec.rank, s, rec.time)
            if series.add(rec.time, value, s):
                events.extend(self._judge_rank(rec, series, s))
        avail = rec.host_mem_available_bytes
        if avail is not None and math.isfinite(avail) and avail >= 0:
            series = self._series(self.machines, self._host(rec.rank), s, rec.time)
            if series.add(rec.time, -avail, s):
                events.extend(self._judge_machine(rec, series, s))
        return events

    # -- per process ---------------------------------------------------------
    def _judge_rank(self, rec: Record, series: _Series, s: HostMemoryLeakSettings) -> list[Event]:
        step = rec.step or 0
        was_open = series.growth is not None
        series.growth = series.judge(s, rec.time)
        if series.growth is None:
            if was_open:
                return [resolved(self.name, rec.rank, step, rec.time,
                                 f"host memory of rank {rec.rank} stopped growing (its floor is flat "
                                 f"or fell back), now {series.buckets.last / 1e9:.2f} GB",
                                 scope="process")]
            return []
        if was_open:
            return []
        g = series.growth
        rate_mb_h = g.rate * HOUR / MB
        host = self._host(rec.rank)
        rates = [x.growth.rate for r, x in self.ranks.items()
                 if x.growth is not None and self._host(r) == host]
        combined = sum(rates)
        avail = self.run.ranks[rec.rank].latest.get("host_mem_available_bytes")
        hours = None if avail is None else avail / combined / HOUR
        summary = (f"host memory of rank {rec.rank} grows {rate_mb_h:.0f} MB/hour, steadily over "
                   f"the last {g.lookback / 60:.0f} min (+{g.rise / MB:.0f} MB, now "
                   f"{series.buckets.last / 1e9:.2f} GB); ")
        if avail is None or hours is None:
            summary += "the machine's available memory is not reported"
        else:
            who = "at that rate" if len(rates) == 1 else (
                f"at the {combined * HOUR / MB:.0f} MB/hour of its {len(rates)} leaking ranks")
            summary += (f"{who} the machine's {avail / 1e9:.1f} GB available is gone in "
                        f"~{hours:.1f} h")
        severity: Severity = "critical" if hours is not None and hours <= s.critical_hours else "warning"
        return [firing(self.name, rec.rank, step, rec.time, summary, severity, scope="process",
                       rate_mb_per_hour=round(rate_mb_h, 1), growth_mb=round(g.rise / MB, 1),
                       lookback_seconds=g.lookback, host_mem_bytes=series.buckets.last,
                       host_mem_available_bytes=avail,
                       hours_to_exhaustion=None if hours is None else round(hours, 2))]

    # -- per machine ---------------------------------------------------------
    def _judge_machine(self, rec: Record, series: _Series, s: HostMemoryLeakSettings) -> list[Event]:
        avail = -series.buckets.last
        growth = series.judge(s, rec.time)
        # fire when the forecast is within the horizon; resolve when it moves well past it
        horizon = s.machine_horizon_hours * HOUR * (1 if series.growth is None else 2)
        if growth is not None and avail / growth.rate > horizon:
            growth = None
        series.growth = growth
        return self._machine_events(rec, s)

    def _machine_events(self, rec: Record, s: HostMemoryLeakSettings) -> list[Event]:
        step = rec.step or 0
        worst = min(((-x.buckets.last / x.growth.rate, host) for host, x in self.machines.items()
                     if x.growth is not None), default=None)
        if worst is None:
            if self.machine_open is None:
                return []
            host, self.machine_open = self.machine_open, None
            return [resolved(self.name, None, step, rec.time,
                             f"available memory on {host or 'the machine'} stopped falling",
                             scope="machine", host=host or None)]
        if self.machine_open is not None:
            return []
        seconds, host = worst
        x = self.machines[host]
        self.machine_open = host
        avail = -x.buckets.last
        rate_mb_h = x.growth.rate * HOUR / MB  # type: ignore[union-attr]
        hours = seconds / HOUR
        summary = (f"available memory on {host or 'the machine'} falls {rate_mb_h:.0f} MB/hour "
                   f"(now {avail / 1e9:.1f} GB); at that rate it is gone in ~{hours:.1f} h")
        severity: Severity = "critical" if hours <= s.critical_hours else "warning"
        return [firing(self.name, None, step, rec.time, summary, severity, scope="machine",
                       host=host or None, rate_mb_per_hour=round(rate_mb_h, 1),
                       host_mem_available_bytes=avail, hours_to_exhaustion=round(hours, 2))]

    # -- lifecycle -----------------------------------------------------------
    def _restart(self, rec: Record) -> list[Event]:
        """A new process (start) or its end: its memory history no longer applies."""
        series = self.ranks.pop(rec.rank, None)
        if series is None or series.growth is None:
            return []
        why = "restarted" if rec.type == "start" else "ended"
        return [resolved(self.name, rec.rank, rec.step or 0, rec.time,
                         f"rank {rec.rank} {why}; its host memory history starts over",
                         scope="process")]

    def _host(self, rank: int) -> str:
        state = self.run.ranks.get(rank)
        return (state.host if state is not None else None) or ""

    @staticmethod
    def _series(table: dict, key, s: HostMemoryLeakSettings, t: float) -> _Series:  # type: ignore[no-untyped-def]
        series = table.get(key)
        if series is None or series.buckets.width != s.bucket_seconds:  # new, or reconfigured
            series = table[key] = _Series(s, t)
        return series
