"""host_memory_leak: host memory that grows until it runs out, as one incident per run.

Leaks are caught at the speed they kill. Each rank's ``host_mem_bytes`` (PSS of the
process and its DataLoader workers) is watched on two time scales (helpers/host_series.py):

- **fast**: on 5-second minima, a sustained rise since the lowest point of the last 10
  minutes that exhausts the rank's headroom soon: within ``fast_horizon_seconds`` (7 min), or
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

Around those checks (rules and measured delays in docs/memory.md):

- **short**: a rise of 10 s on the raw samples whose time left is within ``fast_lead`` x its age (a
  leak killing within a minute); **seasonal**: under an epoch sawtooth, memory now against memory one
  period ago at the same point of the tooth (a steady leak under DataLoader epochs within ~30 min);
  **fills** (rate falling steadily) are fitted as saturating curves and stay quiet when they level off
  under the headroom.
- **the kernel's facts**: ranks of one host under one limit (``host_mem_limit_bytes``, same
  ``host_mem_cgroup``) are a group whose usage is the cgroup's working set (``host_mem_cgroup_bytes``)
  where the client sends it, else the ranks' own memory summed. Over the limit, or above
  ``near_fraction`` of it and rising, is a page now; the group's own series (its summed rate) runs the
  fast and short checks against the shared headroom.
- **one incident**: one alert per run (rank null), naming the root ranks, their host, the limit, each
  rank's rate and the time left from the summed rate against the shared headroom (the most urgent
  among the groups and machines with a leak). A worse picture rewrites it in place (refresh: no second
  page; severity never lowered); it resolves when nothing it stood on still grows, or its ranks end.

The machine-level series watches ``host_mem_available_bytes`` (negated, through the same machinery):
alone (no leaking rank) it is a fall nobody explains, ``scope = "machine"``. Ranks are grouped into
machines by the ``host`` of their start record; ranks with no host share one machine (the per-node
sidecar). A machine's series is dropped when its last rank ends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..events import Event, Severity, firing, resolved
from ..record import Record
from ..state import RunState
from .base import Detector
from .helpers.host_series import (
    FAST_RECHECK,
    HOUR,
    MB,
    MINUTE,
    RISE,
    HostMemoryLeakSettings,
    Open,
    Series,
    jitter,
)
from .helpers.incident import ranks_phrase
from .helpers.trend import Growth

__all__ = ["HostMemoryLeak", "HostMemoryLeakSettings", "Series", "jitter"]

_RANK = {"info": 0, "warning": 1, "critical": 2}
REAPED_SECONDS = 5.0  # after an OOM kill in its cgroup, a rank silent this long (since before the kill) is gone
JOIN_FRACTION = 0.25  # a rank named beside a group's rise grows at least this fraction of the fastest one's rate
PEERS_SECONDS = 5.0  # a non-critical incident of a many-rank job waits this long for peers judged with it
GroupKey = tuple[str, str, float]  # host, cgroup path ("" when unknown), limit


_INF = math.inf


def _rate(x: Series) -> float:
    return 0.0 if x.open is None else x.open.growth.rate


def duration(seconds: float) -> str:
    """A forecast a person reads at a glance: '~45 s', '~3.5 min', '~40 min', '~18.6 h'."""
    if seconds < 90:
        return f"~{seconds:.0f} s"
    if seconds < 600:
        return f"~{seconds / 60:.1f} min"
    if seconds < 2 * HOUR:
        return f"~{seconds / 60:.0f} min"
    return f"~{seconds / HOUR:.1f} h"


@dataclass(slots=True)
class Group:
    """The ranks of one host under one memory limit (one cgroup, one container): their usage is one
    series (the cgroup's working set where the client reads it, else the ranks' own memory summed)."""

    host: str
    limit: float
    series: Series
    pss: dict[int, float] = field(default_factory=dict)  # each rank's latest host_mem_bytes
    total: float = 0.0  # their sum
    usage: float = 0.0  # what counts against the limit now
    facts: bool = False  # usage is the kernel's (host_mem_cgroup_bytes), not the ranks' sum
    alarm: str = ""  # "over" the limit, or "near" it and rising: a page whatever the trend says
    alarm_rate: float = 0.0
    leader: int = 2**31  # the lowest rank: its records feed the series
    oom_base: int | None = None  # the cgroup's OOM-kill count when first seen
    oom_kills: int = 0  # processes the OOM killer ended in it since
    reaped: int = 0  # kills already matched with ranks that stopped reporting
    kill_time: float = 0.0  # when the count last rose

    def ranks(self) -> list[int]:
        return sorted(self.pss)


@dataclass(slots=True)
class Incident:
    """The one open host_memory_leak alert of the run."""

    severity: Severity
    ranks: tuple[int, ...]
    where: str  # the group or machine it forecasts against
    alarm: str
    kills: int = 0  # the OOM killer's kills in its cgroup since it was first seen


def _within(left: float, rate: float, horizon: float) -> bool:
    """Whether what is left is gone within the horizon at this rate of loss; nothing left (an exhausted
    machine whose available memory sits flat at 0) is gone now, and a rate of 0 never uses anything up."""
    if rate == 0:
        return left <= 0
    return left / rate <= horizon


class HostMemoryLeak(Detector[HostMemoryLeakSettings]):
    name = "host_memory_leak"
    record_types = ("start", "sample", "end")
    Settings = HostMemoryLeakSettings

    def __init__(self, settings: HostMemoryLeakSettings, run: RunState) -> None:
        super().__init__(settings, run)
        self.ranks: dict[int, Series] = {}
        self.machines: dict[str, Series] = {}  # negated available memory, by host
        self.machine_of: dict[int, Series] = {}  # each rank's machine series (cached: every record needs it)
        self.groups: dict[GroupKey, Group] = {}
        self.group_of: dict[int, Group] = {}
        self.incident: Incident | None = None
        self.pending: float | None = None  # a non-critical incident waits until then for its peers
        self.pending_step = 0
        self.joined: dict[int, float] = {}  # the rates of the picture being drawn (peers that joined it)
        self.whys: list[str] = []  # why each source closed while the incident was open: the resolve's summary

    def update(self, rec: Record) -> list[Event]:
        # the hot path (two series a sample, each folded by Series.add): between minutes a closed fine bucket
        # is judged only when the fast or short check could fire
        s: HostMemoryLeakSettings = self.settings
        if not s.enabled:
            return []
        if rec.type != "sample":
            return self._restart(rec) if rec.type in ("start", "end") else []
        value = rec.host_mem_bytes
        avail = rec.host_mem_available_bytes
        if value is None and avail is None:
            return []
        judged = False
        t = rec.time
        rank = rec.rank
        if value is not None and 0 <= value < _INF:
            limit = rec.host_mem_limit_bytes
            group = self._group(rec, limit, value, s) if limit is not None and limit > 0 else None
            series = self.ranks.get(rank)
            if series is None or (series.settings is not s and not series.matches(s)):
                series = self.ranks[rank] = Series(s, t)
            closed = series.add(t, value, s)
            if closed and (closed & (MINUTE | RISE) or series.open is not None):
                judged = self._judge_rank(rec, value, series, group, s, bool(closed & MINUTE))
            if group is not None:
                if group.oom_kills > group.reaped:
                    judged |= self._reap(rec, group)
                    group = self.group_of.get(rank)
                if group is not None and rank == group.leader:
                    judged |= self._judge_group(rec, group, s)
        if avail is not None and 0 <= avail < _INF:
            series = self.machine_of.get(rank)
            if series is None or (series.settings is not s and not series.matches(s)):
                series = self._machine_series(rec, s)
            used = -avail
            closed = series.add(t, used, s)
            if closed and (closed & (MINUTE | RISE) or series.open is not None):
                judged |= self._judge_machine(rec, avail, series, s, bool(closed & MINUTE))
        if judged:
            return self._incident(rec, s)
        return []

    def _machine_series(self, rec: Record, s: HostMemoryLeakSettings) -> Series:
        host = self._host(rec.rank)
        series = self.machines.get(host)
        if series is None or not series.matches(s):
            series = self.machines[host] = Series(s, rec.time)
        self.machine_of[rec.rank] = series
        return series

    # -- groups: ranks under one limit -----------------------------------------
    def _group(self, rec: Record, limit: float, value: float, s: HostMemoryLeakSettings) -> Group:
        key = (self._host(rec.rank), rec.host_mem_cgroup or "", limit)
        group = self.group_of.get(rec.rank)
        if group is None or (group.host, group.limit) != key[::2] or self.groups.get(key) is not group:
            self._leave_group(rec.rank)
            group = self.groups.get(key)
            if group is None or not group.series.matches(s):
                group = self.groups[key] = Group(key[0], limit, Series(s, rec.time))
            self.group_of[rec.rank] = group
            group.leader = min(group.leader, rec.rank)
            if group.pss:  # a summed usage jumps when a rank joins: its history starts over
                group.series = Series(s, rec.time)
        group.total += value - group.pss.get(rec.rank, 0.0)
        group.pss[rec.rank] = value
        kernel = rec.host_mem_cgroup_bytes
        if kernel is not None and 0 <= kernel < math.inf:
            group.usage, group.facts = kernel, True
        elif not group.facts:
            group.usage = group.total
        kills = rec.host_mem_oom_kills
        if kills is not None and group.facts:
            if group.oom_base is None or kills < group.oom_base:
                group.oom_base = kills
            if kills - group.oom_base > group.oom_kills:
                group.kill_time = rec.time
            group.oom_kills = kills - group.oom_base
        if rec.rank == group.leader:  # one point per round of the ranks' samples (a sum updated in turns
            group.series.add(rec.time, group.usage, s)  # would zigzag), at the lowest rank's
        return group

    def _leave_group(self, rank: int) -> None:
        group = self.group_of.pop(rank, None)
        if group is None:
            return
        group.total -= group.pss.pop(rank, 0.0)
        group.leader = min(group.pss, default=2**31)
        if group.pss and not group.facts:  # and falls when one leaves
            group.series = Series(group.series.settings, group.series.recent[-1][0] if group.series.recent else 0.0)
        if not group.pss:
            self.groups = {k: g for k, g in self.groups.items() if g is not group}

    def _reap(self, rec: Record, group: Group) -> bool:
        """The kernel's OOM killer ended a process in the group's cgroup (a surviving peer's sample says so):
        the ranks of the group that stopped reporting since are gone, and no longer count in the incident (a
        killed rank sends no end record; naming the death is rank_failed's)."""
        gone = [r for r in group.ranks() if r != rec.rank
                and (self.run.ranks[r].last_sample_time or 0.0) < min(rec.time - REAPED_SECONDS, group.kill_time)]
        if not gone:
            if rec.time > group.kill_time + 60:  # nobody went away: a process other than the ranks
                group.reaped = group.oom_kills
            return False
        group.reaped += len(gone)
        group.series = Series(group.series.settings, rec.time)  # what it held was freed: its history starts over
        for r in gone:
            self.ranks.pop(r, None)
            self.machine_of.pop(r, None)
            self._leave_group(r)
            self._closed(f"rank {r} stopped reporting after the kernel's OOM killer ended a process in its cgroup")
        return True

    def _judge_group(self, rec: Record, group: Group, s: HostMemoryLeakSettings) -> bool:
        """The kernel's facts first: over the limit, or near it and rising, is a page now. Then the
        fast and short checks on the group's usage (the summed rate of its ranks) against its headroom."""
        t, usage, limit = rec.time, group.usage, group.limit
        was = group.alarm
        if usage >= s.near_fraction * limit:
            rate = group.series.rate_since(t - s.near_seconds)
            recent = [p for p in group.series.recent if p[0] >= t - s.near_seconds]
            rising = bool(recent) and usage - min(p[1] for p in recent) >= s.near_rise_fraction * limit
            if usage >= limit:
                group.alarm = "over"
            elif rising:
                group.alarm = "near"
            elif was and usage - min(p[1] for p in group.series.fine.ring.items(t - 10 * s.near_seconds)
                                     or [(t, usage)]) < s.near_rise_fraction * limit:
                group.alarm = ""  # flat for a while under the limit
            group.alarm_rate = max(rate, group.alarm_rate if was else 0.0) if group.alarm else 0.0
        elif was:
            group.alarm = ""
        if was and not group.alarm:
            self._closed(f"usage under the {limit / 1e9:.2f} GB memory limit stopped rising "
                         f"(now {usage / 1e9:.2f} GB)")
        judged = group.alarm != was or (self.incident is not None and self.incident.kills != group.oom_kills
                                         and self.group_of.get(rec.rank) is group)
        series = group.series
        headroom = limit - usage
        avail = self.run.ranks[rec.rank].latest.get("host_mem_available_bytes")
        if avail is not None:
            headroom = min(headroom, avail)
        op = series.open
        if op is None:
            if series.opens_fast(t, usage, headroom, s):
                return True
        elif t >= op.next_check:
            self._recheck_fast(series, op, t, headroom, s,
                               f"usage under the {limit / 1e9:.2f} GB memory limit stopped rising fast")
            return True
        return judged

    # -- per process -------------------------------------------------------------
    def _judge_rank(self, rec: Record, value: float, series: Series, group: Group | None,
                    s: HostMemoryLeakSettings, minute: bool) -> bool:
        """Whether the rank's own judgement changed (opened, closed, or a new growth)."""
        t, op = rec.time, series.open
        headroom = self._headroom(rec.rank, value, group)
        if op is None or op.kind == "steady":
            if headroom is not None and series.opens_fast(t, value, headroom, s, short=op is None):
                return True
        if op is not None and op.kind == "fast":
            if t < op.next_check:
                return False
            op.next_check = t + FAST_RECHECK
            growth = series.fast_still_rising(t, math.inf if headroom is None else headroom, s)
            if growth is None:
                growth = series.steady(s, t)
                if growth is None:
                    series.open = None
                    self._closed(f"host memory of rank {rec.rank} stopped rising fast, now {value / 1e9:.2f} GB")
                    return True
                op.kind = "steady"  # slower now: the steady rules decide from here on
            op.growth = growth
            return True
        if not minute:
            return False
        if op is not None and op.kind == "seasonal":
            growth = series.seasonal(s, t, lenient=True) or series.steady(s, t)
        else:
            growth, kind = series.steady(s, t), "steady"
            if growth is None and op is None and headroom is not None:
                growth, kind = series.seasonal(s, t), "seasonal"
                # judged early (one period in): only a leak that matters today, counting every rank of the
                # machine as leaking alike (they share the sawtooth); slower ones wait for the steady check
                if growth is not None:
                    host = self._host(rec.rank)
                    peers = sum(1 for r in self.ranks if self._host(r) == host)
                    if not _within(headroom, growth.rate * peers, s.warning_hours * HOUR):
                        growth = None
        if growth is None:
            if op is None:
                return False
            series.open = None
            self._closed(f"host memory of rank {rec.rank} stopped growing (its floor is flat or fell back), "
                         f"now {value / 1e9:.2f} GB")
            return True
        if op is None:
            series.open = Open(growth, kind, "info", t - growth.lookback)
        else:
            op.growth = growth
        return True

    def _headroom(self, rank: int, value: float, group: Group | None) -> float | None:
        """The machine's available memory and, under a limit, what is left under it; the smaller."""
        avail = self.run.ranks[rank].latest.get("host_mem_available_bytes")
        if group is None:
            return avail
        under = group.limit - group.usage
        return under if avail is None else min(avail, under)

    # -- per machine ---------------------------------------------------------------
    def _judge_machine(self, rec: Record, avail: float, series: Series, s: HostMemoryLeakSettings,
                       minute: bool) -> bool:
        t, op = rec.time, series.open
        if op is None or op.kind == "steady":
            if series.opens_fast(t, -avail, avail, s, short=op is None):
                return True
        elif op.kind == "fast":
            if t < op.next_check:
                return False
            self._recheck_fast(series, op, t, avail, s,
                               f"available memory on {self._host(rec.rank) or 'the machine'} stopped falling")
            return True
        if not minute:
            return False
        growth = series.steady(s, t)
        # open when the forecast is within the horizon; close when it moves well past it
        horizon = s.machine_horizon_hours * HOUR * (1 if op is None else 2)
        if growth is not None and not _within(avail, growth.rate, horizon):
            growth = None
        if growth is None:
            if op is None:
                return False
            series.open = None
            self._closed(f"available memory on {self._host(rec.rank) or 'the machine'} stopped falling")
            return True
        series.open = Open(growth, "steady", "warning")
        return True

    # -- the incident: one alert for the run -----------------------------------------
    def tick(self, now: float) -> list[Event]:
        if self.pending is None or now < self.pending:
            return []
        return self._incident_at(now, self.pending_step, self.settings)

    def _incident(self, rec: Record, s: HostMemoryLeakSettings) -> list[Event]:
        return self._incident_at(rec.time, rec.step or 0, s)

    def _incident_at(self, time: float, step: int, s: HostMemoryLeakSettings) -> list[Event]:
        picture = self._picture(s)
        if picture is None:
            self.pending = None
            if self.incident is None:
                return []
            self.incident = None
            why = "; ".join(sorted(set(self.whys), key=lambda w: (not w.startswith("host memory"), w)))
            self.whys = []
            return [resolved(self.name, None, step, time, why or "host memory stopped growing")]
        severity, ranks, where, alarm, summary, data = picture
        kills = data.get("oom_kills", 0)
        inc = self.incident
        if inc is not None:
            if _RANK[severity] < _RANK[inc.severity]:
                severity = inc.severity  # never lowered while open
            if (severity, ranks, where, alarm, kills) == (inc.severity, inc.ranks, inc.where, inc.alarm, inc.kills):
                return []
        if inc is None:
            self.whys = []
        if inc is None and severity != "critical" and ranks and len(self.ranks) > 1:
            # a steady leak in a job of many ranks: their minutes close one after another; wait a few
            # seconds so the page names every rank judged leaking at the same time (and their summed forecast)
            if self.pending is None:
                self.pending, self.pending_step = time + PEERS_SECONDS, step
                return []
            if time < self.pending:
                return []
        self.pending = None
        self.incident = Incident(severity, ranks, where, alarm, kills)
        event = firing(self.name, None, step, time, summary, severity, **data)
        event.refresh = inc is not None  # escalated in place: the same alert, nobody paged twice
        return [event]

    def _picture(self, s: HostMemoryLeakSettings) -> tuple[Severity, tuple[int, ...], str, str, str,
                                                           dict[str, Any]] | None:
        """The most urgent forecast among the limits and machines with a leak, or None when none is left."""
        leaking = {r: x for r, x in self.ranks.items() if x.open is not None}
        rates = {r: _rate(x) for r, x in leaking.items()}
        seasonal = {self._host(r) for r, x in leaking.items() if x.open.kind == "seasonal"}  # type: ignore[union-attr]
        for r, x in self.ranks.items():  # under one sawtooth, peers rising with it are the same leak
            if r not in leaking and self._host(r) in seasonal and x.recent:
                growth = x.seasonal(s, x.recent[-1][0], lenient=True)
                if growth is not None and growth.rate > 0:
                    leaking[r], rates[r] = x, growth.rate
        candidates: list[tuple[float, int, str, Any]] = []  # (seconds, -alarm, key, what)
        for key, g in self.groups.items():
            mine = [r for r in leaking if self.group_of.get(r) is g]
            if not (g.alarm or g.series.open is not None or mine):
                continue
            rate = max(sum(rates[r] for r in mine),
                       g.series.open.growth.rate if g.series.open is not None else 0.0, g.alarm_rate)
            headroom = g.limit - g.usage
            avail = self._avail(g.host)
            if avail is not None:
                headroom = min(headroom, avail)
            seconds = 0.0 if g.alarm == "over" else (max(0.0, headroom) / rate if rate > 0 else math.inf)
            candidates.append((seconds, -len(g.alarm), f"{key[0]}|{key[1]}|{key[2]}",
                               ("group", g, sorted(mine), rate)))
        grouped = {r for r in leaking if r in self.group_of}
        hosts = {self._host(r) for r in leaking if r not in grouped} | {
            h for h, x in self.machines.items() if x.open is not None}
        for host in hosts:
            machine = self.machines.get(host)
            mine = [r for r in leaking if self._host(r) == host]
            fall = machine.open.growth.rate if machine is not None and machine.open is not None else 0.0
            rate = max(sum(rates[r] for r in mine), fall)
            avail = self._avail(host) if machine is None else -machine.last
            left = None if avail is None else max(0.0, avail) / rate if rate > 0 else math.inf
            candidates.append((math.inf if left is None else left, 0, f"{host}|machine",
                               ("machine", host, sorted(mine), rate, left)))
        if not candidates:
            return None
        seconds, _, where, what = min(candidates, key=lambda c: (c[0], c[1]))
        self.joined = rates
        if what[0] == "group":
            return self._describe_group(what[1], what[2], what[3], seconds, where, s)
        return self._describe_machine(what[1], what[2], what[3], what[4], where, s)

    def _rates(self, ranks: list[int], since: float | None) -> dict[int, float]:
        out = {}
        for r in ranks:
            x = self.ranks.get(r)
            if x is None:
                continue
            if x.open is not None:
                out[r] = x.open.growth.rate
            elif r in self.joined:
                out[r] = self.joined[r]
            elif since is not None:
                out[r] = x.rate_since(since)
        return out

    def _describe_group(self, g: Group, mine: list[int], rate: float, seconds: float, where: str,
                        s: HostMemoryLeakSettings) -> tuple[Severity, tuple[int, ...], str, str, str, dict[str, Any]]:
        lead = g.series.open.growth if g.series.open is not None else None
        since = self._now(g) - (lead.lookback if lead is not None else s.near_seconds)
        if lead is not None or g.alarm or not mine:  # the group's own rise: every rank of it that grows with it
            # a peer joins when it grows a part of the rise that counts: more than a tenth of an even share,
            # and at least JOIN_FRACTION of the fastest rank's rate (a healthy rank creeping 0.7 MB/s beside a
            # leak of 11 MB/s is not a root)
            others = self._rates([r for r in g.ranks() if r not in mine], since)
            top = max([*others.values(), *self._rates(mine, since).values()], default=0.0)
            floor = max(0.1 * rate / max(1, len(g.pss)), JOIN_FRACTION * top)
            mine = sorted(set(mine) | {r for r, v in others.items() if v > floor}) or g.ranks()
        rates = self._rates(mine, since)
        first = next((self.ranks[r].open for r in mine if r in self.ranks and self.ranks[r].open), None)
        growth = lead or (first.growth if first is not None else None)
        kind = ("limit" if g.alarm else "fast" if g.series.open is not None
                else first.kind if first is not None else "limit")
        severity: Severity = "critical" if g.alarm else self._severity(seconds, s)
        who = ranks_phrase(mine) if mine else "its ranks"
        on = f" on {g.host}" if g.host else ""
        whose = "its" if len(mine) == 1 else "their"
        used = f"{g.usage / 1e9:.2f} GB" + (" charged to the cgroup" if g.facts else "")
        if g.alarm == "over":
            summary = (f"{who}{on} are over {whose} {g.limit / 1e9:.2f} GB memory limit ({used}), still "
                       f"growing {rate / MB:.1f} MB/s: the kernel kills at the limit, memory must come down now")
            if len(mine) == 1:
                summary = summary.replace(" are over ", " is over ", 1)
        elif g.alarm == "near":
            summary = (f"{who}{on} {'is' if len(mine) == 1 else 'are'} at {100 * g.usage / g.limit:.0f}% of "
                       f"{whose} {g.limit / 1e9:.2f} GB memory limit ({used}) and rising {rate / MB:.1f} MB/s: "
                       f"the {max(0.0, g.limit - g.usage) / 1e9:.2f} GB left is gone in {duration(seconds)}")
        else:
            summary = self._growth_phrase(mine, rates, growth, kind, rate) + (
                f"the {max(0.0, g.limit - g.usage) / 1e9:.2f} GB left under {whose} {g.limit / 1e9:.2f} GB "
                f"memory limit is gone in {duration(seconds)}")
        if g.oom_kills:
            summary += (f"; the kernel's OOM killer has ended {g.oom_kills} process"
                        f"{'es' if g.oom_kills > 1 else ''} in that cgroup since (see rank_failed)")
        avail = self._avail(g.host)
        data = self._data(mine, rates, growth, kind, rate, seconds, g.host, "process" if mine else "limit")
        data.update(host_mem_available_bytes=avail, host_mem_limit_bytes=g.limit,
                    headroom_bytes=g.limit - g.usage if avail is None else min(avail, g.limit - g.usage),
                    limit_used_bytes=g.usage, limit_used_source="cgroup" if g.facts else "ranks",
                    limit_fraction=round(g.usage / g.limit, 4), oom_kills=g.oom_kills)
        return severity, tuple(mine), where, g.alarm, summary, data

    def _describe_machine(self, host: str, mine: list[int], rate: float, seconds: float | None, where: str,
                          s: HostMemoryLeakSettings) -> tuple[Severity, tuple[int, ...], str, str, str, dict[str, Any]]:
        machine = self.machines.get(host)
        avail = self._avail(host) if machine is None else -machine.last
        rates = self._rates(mine, None)
        first = next((self.ranks[r].open for r in mine if r in self.ranks and self.ranks[r].open), None)
        if first is not None:
            growth, kind = first.growth, first.kind
            summary = self._growth_phrase(mine, rates, growth, kind, rate)
            if seconds is None or avail is None:
                summary += "the machine's available memory is not reported"
            else:
                summary += f"the machine's {avail / 1e9:.1f} GB available is gone in {duration(seconds)}"
        else:
            op = machine.open  # type: ignore[union-attr]
            growth, kind = op.growth, op.kind  # type: ignore[union-attr]
            summary = (f"available memory on {host or 'the machine'} falls {rate * HOUR / MB:.0f} MB/hour "
                       f"(now {(avail or 0.0) / 1e9:.1f} GB) and no rank's own memory explains it; at that rate "
                       f"it is gone in {duration(seconds or math.inf)}")
        severity = self._severity(seconds, s)
        if first is None and severity == "info":
            severity = "warning"
        data = self._data(mine, rates, growth, kind, rate, seconds, host, "process" if mine else "machine")
        data.update(host_mem_available_bytes=avail, host_mem_limit_bytes=None, headroom_bytes=avail)
        return severity, tuple(mine), where, "", summary, data

    def _growth_phrase(self, mine: list[int], rates: dict[int, float], growth: Growth | None, kind: str,
                       rate: float) -> str:
        """ "host memory of rank 1 rose 1.57 GB in the last 40 s (40.3 MB/s, steadily; now 4.81 GB); at that
        rate " (one rank), or the ranks with each one's rate and the combined rate."""
        if len(mine) == 1 and growth is not None:
            r = mine[0]
            now = self.ranks[r].last
            if kind == "fast":
                return (f"host memory of rank {r} rose {growth.rise / 1e9:.2f} GB in the last "
                        f"{growth.lookback:.0f} s ({growth.rate / MB:.1f} MB/s, steadily; now {now / 1e9:.2f} GB); "
                        f"at that rate ")
            return (f"host memory of rank {r} grows {growth.rate * HOUR / MB:.0f} MB/hour, steadily over "
                    f"the last {growth.lookback / 60:.0f} min (+{growth.rise / MB:.0f} MB, now {now / 1e9:.2f} GB); "
                    f"at that rate ")
        each = ", ".join(f"{r}: {v / MB:.1f}" for r, v in sorted(rates.items())[:8])
        more = f" and {len(rates) - 8} more" if len(rates) > 8 else ""
        who = ranks_phrase(mine) if mine else "the ranks"
        return (f"host memory of {who} grows {rate / MB:.1f} MB/s together (MB/s by rank: {each}{more}); "
                f"at that rate ")

    def _data(self, mine: list[int], rates: dict[int, float], growth: Growth | None, kind: str, rate: float,
              seconds: float | None, host: str, scope: str) -> dict[str, Any]:
        now = self.ranks[mine[0]].last if len(mine) == 1 and mine[0] in self.ranks else None
        return dict(
            scope=scope, root_ranks=list(mine), host=host or None, detection=kind,
            rate_mb_per_hour=round(rate * HOUR / MB, 1),
            rank_rates_mb_per_hour=[round(rates.get(r, 0.0) * HOUR / MB, 1) for r in mine],
            growth_mb=None if growth is None else round(growth.rise / MB, 1),
            lookback_seconds=None if growth is None else round(growth.lookback, 1),
            host_mem_bytes=now,
            seconds_to_exhaustion=None if seconds is None or math.isinf(seconds) else round(seconds),
            hours_to_exhaustion=None if seconds is None or math.isinf(seconds) else round(seconds / HOUR, 3))

    @staticmethod
    def _severity(seconds: float | None, s: HostMemoryLeakSettings) -> Severity:
        if seconds is None:
            return "warning"  # no forecast: a steady leak is still worth a look
        if seconds <= s.critical_hours * HOUR:
            return "critical"
        return "warning" if seconds <= s.warning_hours * HOUR else "info"

    def _avail(self, host: str) -> float | None:
        machine = self.machines.get(host)
        return None if machine is None else -machine.last

    def _now(self, g: Group) -> float:
        return g.series.recent[-1][0] if g.series.recent else 0.0

    # -- lifecycle ---------------------------------------------------------------------
    def _restart(self, rec: Record) -> list[Event]:
        """A new process (start) or its end: its memory history no longer applies; the incident follows
        (it resolves when no rank, limit or machine it stood on still grows)."""
        self.machine_of.pop(rec.rank, None)  # its host may change with a start
        series = self.ranks.pop(rec.rank, None)
        self._leave_group(rec.rank)
        host = self._host(rec.rank)
        if not any(self._host(r) == host for r in self.ranks):
            self.machines.pop(host, None)  # nobody left to watch that machine for
        if series is None and self.incident is None:
            return []
        why = "restarted" if rec.type == "start" else "ended"
        self._closed(f"rank {rec.rank} {why}; its host memory history starts over")
        return self._incident(rec, self.settings) if self.incident is not None else []

    def _recheck_fast(self, series: Series, op: Open, t: float, headroom: float, s: HostMemoryLeakSettings,
                      stopped: str) -> None:
        """An open fast alert of a group or a machine, due for its recheck: its growth now, or closed
        (``stopped`` says why) once the rise no longer exhausts ``headroom`` soon."""
        op.next_check = t + FAST_RECHECK
        growth = series.fast_still_rising(t, headroom, s)
        if growth is None:
            series.open = None
            self._closed(stopped)
        else:
            op.growth = growth

    def _closed(self, why: str) -> None:
        if len(self.whys) < 8:
            self.whys.append(why)

    def _host(self, rank: int) -> str:
        state = self.run.ranks.get(rank)
        return (state.host if state is not None else None) or ""
