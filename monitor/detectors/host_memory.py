"""host_memory_leak: host memory that grows until it runs out, per rank and per machine.

Leaks are caught at the speed they kill. Each rank's ``host_mem_bytes`` (PSS of the
process and its DataLoader workers) is watched on two time scales (host_series.py):

- **fast**: on 5-second minima, a sustained rise since the lowest point of the last 10
  minutes that exhausts the rank's headroom soon: within ``fast_horizon_seconds`` (5 min), or
  within ``fast_lead`` (4) times how long it has been rising. A leak that would exhaust the
  machine in 5 minutes is reported about 40-50 s after it starts, warmup or not. "Sustained"
  means at least ``fast_min_seconds`` (40 s), a recent half rising as much as the older half
  (a start-up that saturates bends; one allocation sits in one half), more than noise, and
  longer than any sawtooth tooth seen on the fine minima;
- **steady**: on per-minute minima after the first ``warmup_seconds`` (5 min), the *floor*
  (lowest minute over a trailing span) rises steadily by Theil-Sen over lookbacks that double
  from ``min_window_seconds`` (20 min) to ``window_seconds`` (2 h): GB/hour leaks are reported
  within 30 minutes, slow ones under noise within two hours. Sawtooths (memory falling back by
  half of what it gained) stretch the floor over their period; saturating growth fails the
  balance of the halves (stricter, ``short_balance``, on lookbacks under 30 min).

The **headroom** of a rank is the machine's available memory (``host_mem_available_bytes``)
and, where the client reports the process's own limit (``host_mem_limit_bytes``: cgroup
``memory.max``, or ``TRAINHEALTH_MEMORY_LIMIT``), the limit less the memory of the ranks of the
same host that report the same limit (one container or job cgroup), whichever is smaller. The
forecast is the headroom over the combined rate of the leaking ranks of that host, and sets the
severity: critical within ``critical_hours``, warning within ``warning_hours``, info beyond (a
slow leak on a big machine is worth knowing, not a page). An open alert whose forecast gets
worse is raised again at the higher severity ("superseded"); it is never lowered.

The machine-level check watches ``host_mem_available_bytes`` (negated, through the same
machinery) and fires when available memory is forecast to reach zero within
``machine_horizon_hours`` (steady) or soon (fast). It is the same alert name with ``rank =
null`` and ``scope = "machine"``: one open machine alert per run, naming the machine with the
nearest exhaustion, and none while the leaking ranks of that machine explain half its fall or
more (they page already: one incident, one page). Ranks are grouped into machines by the ``host`` of their start record;
ranks with no host are taken to share one machine (the per-node sidecar).

Resolution: a steady alert when the floor's rate over the last ``window_seconds / 2`` is below
half of ``min_rate_mb_per_hour`` and over the whole window below it, or when memory falls back
like a sawtooth; a fast alert when the rise over the last half fast window no longer exhausts
the headroom within twice ``critical_hours`` (unless the steady check then holds it); any when
the rank restarts or ends.
"""

from __future__ import annotations

import math

from ..events import Event, Severity, firing, resolved
from ..record import Record
from ..state import RunState
from .base import Detector
from .host_series import FAST_RECHECK, HOUR, MB, MINUTE, HostMemoryLeakSettings, Open, Series, jitter
from .trend import Growth

__all__ = ["HostMemoryLeak", "HostMemoryLeakSettings", "Series", "jitter"]

_RANK = {"info": 0, "warning": 1, "critical": 2}


def duration(seconds: float) -> str:
    """A forecast a person reads at a glance: '~45 s', '~3.5 min', '~40 min', '~18.6 h'."""
    if seconds < 90:
        return f"~{seconds:.0f} s"
    if seconds < 600:
        return f"~{seconds / 60:.1f} min"
    if seconds < 2 * HOUR:
        return f"~{seconds / 60:.0f} min"
    return f"~{seconds / HOUR:.1f} h"


class HostMemoryLeak(Detector[HostMemoryLeakSettings]):
    name = "host_memory_leak"
    Settings = HostMemoryLeakSettings

    def __init__(self, settings: HostMemoryLeakSettings, run: RunState) -> None:
        super().__init__(settings, run)
        self.ranks: dict[int, Series] = {}
        self.machines: dict[str, Series] = {}  # negated available memory, by host
        self.machine_open: tuple[str, Severity] | None = None  # host and severity of the open machine alert
        self.machine_of: dict[int, Series] = {}  # each rank's machine series (cached: every record needs it)

    def update(self, rec: Record) -> list[Event]:
        s: HostMemoryLeakSettings = self.settings
        if not s.enabled:
            return []
        if rec.type != "sample":
            return self._restart(rec) if rec.type in ("start", "end") else []
        events: list[Event] = []
        value = rec.host_mem_bytes
        if value is not None and 0 <= value < math.inf:
            series = self.ranks.get(rec.rank)
            if series is None or not series.matches(s):
                series = self.ranks[rec.rank] = Series(s, rec.time)
            closed = series.add(rec.time, value, s)
            if closed:
                events.extend(self._judge_rank(rec, value, series, s, bool(closed & MINUTE)))
        avail = rec.host_mem_available_bytes
        if avail is not None and 0 <= avail < math.inf:
            series = self.machine_of.get(rec.rank)
            if series is None or not series.matches(s):
                series = self._machine_series(rec, s)
            closed = series.add(rec.time, -avail, s)
            if closed:
                events.extend(self._judge_machine(rec, avail, series, s, bool(closed & MINUTE)))
        return events

    def _machine_series(self, rec: Record, s: HostMemoryLeakSettings) -> Series:
        host = self._host(rec.rank)
        series = self.machines.get(host)
        if series is None or not series.matches(s):
            series = self.machines[host] = Series(s, rec.time)
        self.machine_of[rec.rank] = series
        return series

    # -- per process ---------------------------------------------------------
    def _judge_rank(self, rec: Record, value: float, series: Series, s: HostMemoryLeakSettings,
                    minute: bool) -> list[Event]:
        t, op = rec.time, series.open
        if op is None or op.severity != "critical":
            bound = self._headroom_bound(rec, value)
            if bound is not None and series.fast_candidate(t, value, bound, s):
                headroom = self._headroom(rec.rank)[0]
                growth = None if headroom is None else series.fast_growth(t, value, headroom, s)
                if growth is not None:
                    return self._raise(rec, series, growth, "fast", s)
        if op is not None and op.kind == "fast":
            if t < op.next_check:
                return []
            op.next_check = t + FAST_RECHECK
            headroom = self._headroom(rec.rank)[0]
            growth = series.fast_still_rising(t, math.inf if headroom is None else headroom, s)
            if growth is None:
                growth = series.steady(s, t)
                if growth is None:
                    return self._resolve(rec, series, "stopped rising fast")
                op.kind = "steady"  # slower now: the steady rules decide from here on
            op.growth = growth
            return []
        if not minute:
            return []
        growth = series.steady(s, t)
        if growth is None:
            return [] if op is None else self._resolve(rec, series, "stopped growing (its floor is flat "
                                                                     "or fell back)")
        return self._raise(rec, series, growth, "steady", s)

    def _raise(self, rec: Record, series: Series, growth: Growth, kind: str,
               s: HostMemoryLeakSettings) -> list[Event]:
        """Open the alert, or raise its severity when the forecast got worse; else keep it quiet."""
        op = series.open
        if op is not None:
            op.growth = growth
        headroom, avail, limit = self._headroom(rec.rank)
        host = self._host(rec.rank)
        rates = [x.growth.rate for r, x in self.ranks.items()
                 if x.growth is not None and self._host(r) == host and r != rec.rank] + [growth.rate]
        combined = sum(rates)
        seconds = None if headroom is None else max(0.0, headroom) / combined if combined > 0 else math.inf
        severity = self._severity(seconds, s)
        if op is not None and _RANK[severity] <= _RANK[op.severity]:
            return []
        out: list[Event] = []
        step = rec.step or 0
        if op is not None:
            out.append(resolved(self.name, rec.rank, step, rec.time,
                                f"superseded: the forecast for rank {rec.rank} got worse", scope="process"))
        series.open = Open(growth, kind, severity, rec.time - growth.lookback)
        rate_mb_h = growth.rate * HOUR / MB
        now = series.buckets.last
        if kind == "fast":
            summary = (f"host memory of rank {rec.rank} rose {growth.rise / 1e9:.2f} GB in the last "
                       f"{growth.lookback:.0f} s ({growth.rate / MB:.1f} MB/s, steadily; now {now / 1e9:.2f} GB); ")
        else:
            summary = (f"host memory of rank {rec.rank} grows {rate_mb_h:.0f} MB/hour, steadily over "
                       f"the last {growth.lookback / 60:.0f} min (+{growth.rise / MB:.0f} MB, now "
                       f"{now / 1e9:.2f} GB); ")
        if seconds is None or headroom is None:
            summary += "the machine's available memory is not reported"
        else:
            who = "at that rate" if len(rates) == 1 else (
                f"at the {combined * HOUR / MB:.0f} MB/hour of its {len(rates)} leaking ranks")
            if avail is not None and headroom == avail:
                what = f"the machine's {avail / 1e9:.1f} GB available"
            else:
                what = f"the {max(0.0, headroom) / 1e9:.2f} GB left under its {limit / 1e9:.2f} GB memory limit"  # type: ignore[operator]
            summary += f"{who} {what} is gone in {duration(seconds)}"
        out.append(firing(self.name, rec.rank, step, rec.time, summary, severity, scope="process",
                          detection=kind, rate_mb_per_hour=round(rate_mb_h, 1),
                          growth_mb=round(growth.rise / MB, 1), lookback_seconds=round(growth.lookback, 1),
                          host_mem_bytes=now, host_mem_available_bytes=avail, host_mem_limit_bytes=limit,
                          headroom_bytes=headroom,
                          seconds_to_exhaustion=None if seconds is None else round(seconds),
                          hours_to_exhaustion=None if seconds is None else round(seconds / HOUR, 3)))
        return out

    def _resolve(self, rec: Record, series: Series, why: str) -> list[Event]:
        series.open = None
        return [resolved(self.name, rec.rank, rec.step or 0, rec.time,
                         f"host memory of rank {rec.rank} {why}, now {series.buckets.last / 1e9:.2f} GB",
                         scope="process")]

    @staticmethod
    def _severity(seconds: float | None, s: HostMemoryLeakSettings) -> Severity:
        if seconds is None:
            return "warning"  # no forecast: a steady leak is still worth a look
        if seconds <= s.critical_hours * HOUR:
            return "critical"
        return "warning" if seconds <= s.warning_hours * HOUR else "info"

    # -- headroom ------------------------------------------------------------
    def _headroom_bound(self, rec: Record, value: float) -> float | None:
        """An upper bound of the rank's headroom from its own record (cheap: every fine bucket)."""
        latest = self.run.ranks[rec.rank].latest
        avail = latest.get("host_mem_available_bytes")
        limit = latest.get("host_mem_limit_bytes")
        if limit is None:
            return avail
        return limit - value if avail is None else min(avail, limit - value)

    def _headroom(self, rank: int) -> tuple[float | None, float | None, float | None]:
        """(headroom, available, limit): the machine's available memory, and the limit less what
        the ranks of this host under the same limit use, whichever is smaller; None if neither."""
        latest = self.run.ranks[rank].latest
        avail = latest.get("host_mem_available_bytes")
        limit = latest.get("host_mem_limit_bytes")
        if limit is None:
            return avail, avail, None
        host = self._host(rank)
        used = sum(st.latest.get("host_mem_bytes", 0.0) for r, st in self.run.ranks.items()
                   if st.latest.get("host_mem_limit_bytes") == limit and self._host(r) == host)
        under = limit - used
        return (under if avail is None else min(avail, under)), avail, limit

    # -- per machine ---------------------------------------------------------
    def _judge_machine(self, rec: Record, avail: float, series: Series, s: HostMemoryLeakSettings,
                       minute: bool) -> list[Event]:
        t, op = rec.time, series.open
        if op is None or op.kind == "steady":
            if series.fast_candidate(t, -avail, avail, s):
                growth = series.fast_growth(t, -avail, avail, s)
                if growth is not None:
                    series.open = Open(growth, "fast", "critical", t - growth.lookback)
                    return self._machine_events(rec, s)
        elif op.kind == "fast":
            if t < op.next_check:
                return []
            op.next_check = t + FAST_RECHECK
            growth = series.fast_still_rising(t, avail, s)
            if growth is None:
                series.open = None
            else:
                op.growth = growth
            return self._machine_events(rec, s)
        if not minute:
            return []
        growth = series.steady(s, t)
        # fire when the forecast is within the horizon; resolve when it moves well past it
        horizon = s.machine_horizon_hours * HOUR * (1 if op is None else 2)
        if growth is not None and avail / growth.rate > horizon:
            growth = None
        series.open = None if growth is None else Open(growth, "steady", "warning")
        return self._machine_events(rec, s)

    def _machine_events(self, rec: Record, s: HostMemoryLeakSettings) -> list[Event]:
        step = rec.step or 0
        worst = min(((-x.buckets.last / x.open.growth.rate, host) for host, x in self.machines.items()
                     if x.open is not None and (self.machine_open is not None or not self._explained(host, x))),
                    default=None)
        if worst is None:
            if self.machine_open is None:
                return []
            host, self.machine_open = self.machine_open[0], None
            return [resolved(self.name, None, step, rec.time,
                             f"available memory on {host or 'the machine'} stopped falling",
                             scope="machine", host=host or None)]
        seconds, host = worst
        severity: Severity = "critical" if seconds <= s.critical_hours * HOUR else "warning"
        out: list[Event] = []
        if self.machine_open is not None:
            if _RANK[severity] <= _RANK[self.machine_open[1]]:
                return []
            out.append(resolved(self.name, None, step, rec.time, "superseded: the forecast got worse",
                                scope="machine", host=self.machine_open[0] or None))
        x = self.machines[host]
        self.machine_open = (host, severity)
        growth = x.open.growth  # type: ignore[union-attr]
        avail = -x.buckets.last
        rate_mb_h = growth.rate * HOUR / MB
        summary = (f"available memory on {host or 'the machine'} falls {rate_mb_h:.0f} MB/hour "
                   f"(now {avail / 1e9:.1f} GB); at that rate it is gone in {duration(seconds)}")
        out.append(firing(self.name, None, step, rec.time, summary, severity, scope="machine",
                          host=host or None, detection=x.open.kind,  # type: ignore[union-attr]
                          rate_mb_per_hour=round(rate_mb_h, 1), host_mem_available_bytes=avail,
                          seconds_to_exhaustion=round(seconds), hours_to_exhaustion=round(seconds / HOUR, 3)))
        return out

    def _explained(self, host: str, machine: Series) -> bool:
        """The ranks of ``host`` with open leak alerts account for half its fall or more: one incident,
        already paged per process with its forecast; the machine alert is for falls nobody explains."""
        leaking = sum(x.open.growth.rate for r, x in self.ranks.items() if x.open is not None and self._host(r) == host)
        return machine.open is not None and leaking >= 0.5 * machine.open.growth.rate

    # -- lifecycle -----------------------------------------------------------
    def _restart(self, rec: Record) -> list[Event]:
        """A new process (start) or its end: its memory history no longer applies."""
        self.machine_of.pop(rec.rank, None)  # its host may change with a start
        series = self.ranks.pop(rec.rank, None)
        if series is None or series.open is None:
            return []
        why = "restarted" if rec.type == "start" else "ended"
        return [resolved(self.name, rec.rank, rec.step or 0, rec.time,
                         f"rank {rec.rank} {why}; its host memory history starts over",
                         scope="process")]

    def _host(self, rank: int) -> str:
        state = self.run.ranks.get(rank)
        return (state.host if state is not None else None) or ""
