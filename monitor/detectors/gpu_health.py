"""gpu_fault and gpu_degraded: the rank's GPU as NVML reports it (the record's ``gpu_health``).

What pages and why is written down in docs/gpu-health.md. In short:

- ``gpu_fault`` (critical, one alert per rank): a new XID event in ``xids`` (a fault that
  needs the GPU reset or drained: fallen off the bus, double-bit ECC, GSP or PMU halted, NVLink
  down...), the volatile uncorrectable ECC count rising while the run watches, or row
  remapping that failed (no spare rows left). The summary says what to do: drain the host's
  GPU and restart the job without it. It stays open until the rank starts again (a new
  process on whichever GPU it gets): a broken GPU does not heal because a process exited
  (the pipeline still closes a finished run's alerts once every rank has ended).
- ``gpu_degraded`` (warning, one alert per rank): the GPU still works but slows the job or
  is wearing out: a throttle reason (HW slowdown, HW thermal, HW power brake, SW thermal) or
  an SM clock under ``clock_ratio`` of its maximum, held for ``throttle_seconds``; corrected
  ECC errors, NVLink or PCIe replay/CRC/recovery counts climbing by ``*_increase`` within
  ``window_seconds``; row remapping or page retirement pending (a reset is due); an XID in
  ``xids`` (63: a row remap recorded, 92: a high single-bit error rate) within ``window_seconds``.
  It resolves once none of these hold; while open, a changed picture refreshes it in place.

Readings arrive every few seconds, in heartbeats; a rank without NVML sends none and is
never judged. Both alerts name the host (the rank's start record), the GPU's NVML index and
its PCI bus id. Pure: the record's time is the clock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

from ..config.rules import flag, positive, whole
from ..events import Event, firing, resolved
from ..record import GpuHealth, Record, XidEvent
from ..state import RunState
from .base import Detector

# NVIDIA's XID catalogue (docs.nvidia.com/deploy/xid-errors): what each number means, for the summary
XID_TEXT = {
    13: "graphics engine exception", 31: "GPU memory page fault", 43: "GPU stopped processing",
    45: "preemptive cleanup after an earlier error", 48: "double-bit ECC error",
    61: "internal micro-controller breakpoint/warning", 62: "internal micro-controller halt",
    63: "ECC page retirement or row remapping recorded", 64: "ECC page retirement or row remapping failed",
    74: "NVLink error", 79: "GPU has fallen off the bus", 92: "high single-bit ECC error rate",
    94: "contained ECC error", 95: "uncontained ECC error", 119: "GSP RPC timeout", 120: "GSP error",
}
FAULT_XIDS = (48, 61, 62, 64, 74, 79, 94, 95, 119, 120)
DEGRADED_XIDS = (63, 92)
# NVML's clocks event (throttle) reasons that mean the hardware slows the GPU down, not a setting
THROTTLE_BITS = {0x8: "HW slowdown", 0x40: "HW thermal slowdown", 0x80: "HW power brake slowdown",
                 0x20: "SW thermal slowdown"}
_SLOW_BITS = sum(THROTTLE_BITS)  # any of them (distinct bits)
GPU_IDLE = 0x1
COUNTERS = (("ecc_corrected", "corrected ECC errors", "ecc_corrected_increase"),
            ("nvlink_replay_errors", "NVLink replays", "link_errors_increase"),
            ("nvlink_crc_errors", "NVLink CRC errors", "link_errors_increase"),
            ("nvlink_recovery_errors", "NVLink recoveries", "link_errors_increase"),
            ("pcie_replay_errors", "PCIe replays", "link_errors_increase"))
_counts = attrgetter(*(name for name, _, _ in COUNTERS))  # a reading's counts, in COUNTERS' order


def _xids(settings: Any, name: str) -> None:
    value = settings.xids
    if isinstance(value, list):
        value = settings.xids = tuple(value)  # TOML arrays arrive as lists
    if not isinstance(value, tuple) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                               for x in value):
        raise ValueError(f"{name}.xids: must be a list of XID numbers (integers >= 0), got {value!r}")


@dataclass(kw_only=True, slots=True)
class GpuFaultSettings:
    enabled: bool = True
    xids: tuple[int, ...] = FAULT_XIDS  # XID events that page (docs/gpu-health.md says why these)

    def __post_init__(self) -> None:
        flag(self, "gpu_fault", "enabled")
        _xids(self, "gpu_fault")


@dataclass(kw_only=True, slots=True)
class GpuDegradedSettings:
    enabled: bool = True
    xids: tuple[int, ...] = DEGRADED_XIDS
    throttle_seconds: float = 60.0  # a throttle reason or a low clock held this long
    clock_ratio: float = 0.5  # SM clock under this fraction of its maximum (the GPU not idle)
    window_seconds: float = 3600.0  # counters' climb, and a degraded XID, are judged over this
    ecc_corrected_increase: int = 100  # corrected ECC errors within window_seconds
    link_errors_increase: int = 100  # NVLink replay/CRC/recovery or PCIe replay counts within window_seconds

    def __post_init__(self) -> None:
        flag(self, "gpu_degraded", "enabled")
        _xids(self, "gpu_degraded")
        positive(self, "gpu_degraded", "throttle_seconds", "window_seconds")
        whole(self, "gpu_degraded", "ecc_corrected_increase", "link_errors_increase", minimum=1)
        if not 0 < self.clock_ratio <= 1:
            raise ValueError(f"gpu_degraded.clock_ratio: must be a fraction in (0, 1], got {self.clock_ratio!r}")


@dataclass(slots=True)
class _Gpu:
    """One rank's GPU, as its readings said."""

    index: int | None = None
    pci_bus_id: str | None = None
    seen: set[tuple[int, float]] = field(default_factory=set)  # XID events already judged
    # the last XID list judged (every event of it is in ``seen``): the client sends its list again in every
    # reading, and the same list again holds nothing new
    xids: list[XidEvent] | None = None
    ecc_uncorrected: int | None = None  # the first reading's volatile count: a rise is a fault
    faults: list[str] = field(default_factory=list)  # what the open gpu_fault says
    fault_xids: list[int] = field(default_factory=list)
    slow_since: float | None = None  # throttled or clocked down since (consecutive readings)
    # the counters' readings within the window: one deque of (time, counts) while every reading had all of
    # them, else (None) a deque per counter of (time, count) of the readings that had it
    readings: deque[tuple[float, tuple[int, ...]]] | None = field(default_factory=deque)
    counters: dict[str, deque[tuple[float, int]]] = field(default_factory=dict)
    recent_xids: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=32))
    degraded: tuple[str, ...] | None = None  # what the open gpu_degraded names (kinds, not the numbers)


class _GpuHealthBase:
    """What both detectors keep per rank: its GPU, from ``gpu_health`` readings."""

    def __init__(self) -> None:
        self.gpus: dict[int, _Gpu] = {}

    def where(self, run: RunState, rank: int, g: _Gpu) -> tuple[str, dict[str, Any]]:
        state = run.ranks.get(rank)
        host = (state.host if state is not None else None) or f"rank {rank}'s host"
        gpu = f"GPU {g.index}" if g.index is not None else "its GPU"
        bus = f" ({g.pci_bus_id})" if g.pci_bus_id else ""
        return f"{host} {gpu}{bus}", {"host": state.host if state is not None else None,
                                      "gpu_index": g.index, "pci_bus_id": g.pci_bus_id}

    def gpu(self, rank: int, h: GpuHealth) -> _Gpu:
        g = self.gpus.get(rank)
        if g is None:
            g = self.gpus[rank] = _Gpu()
        if h.index is not None:
            g.index = h.index
        if h.pci_bus_id is not None:
            g.pci_bus_id = h.pci_bus_id
        return g


class GpuFault(_GpuHealthBase, Detector[GpuFaultSettings]):
    name = "gpu_fault"
    record_types = ("start", "gpu_health")
    Settings = GpuFaultSettings

    def __init__(self, settings: GpuFaultSettings, run: RunState) -> None:
        Detector.__init__(self, settings, run)
        _GpuHealthBase.__init__(self)

    def update(self, record: Record) -> list[Event]:
        if record.gpu_health is None and record.type != "start":
            return []  # the common case: no reading to judge, and no restart to forget a GPU for
        if record.type == "start":
            g = self.gpus.pop(record.rank, None)  # a new process: its GPU is read afresh
            if g is not None and g.faults:
                return [resolved(self.name, record.rank, record.step or 0, record.time,
                                 f"rank {record.rank} started again; its GPU is watched afresh")]
            return []
        h = record.gpu_health
        if h is None or not self.settings.enabled:
            return []
        g = self.gpu(record.rank, h)
        found: list[str] = []
        if h.xids and h.xids != g.xids:
            for x in h.xids:
                key = (x.xid, x.time)
                if key in g.seen:
                    continue
                g.seen.add(key)
                if x.xid in self.settings.xids:
                    g.fault_xids.append(x.xid)
                    found.append(f"XID {x.xid}, {XID_TEXT.get(x.xid, 'see the XID catalogue')}")
            g.xids = h.xids
        if h.ecc_uncorrected is not None:
            if g.ecc_uncorrected is None:
                g.ecc_uncorrected = h.ecc_uncorrected
            elif h.ecc_uncorrected > g.ecc_uncorrected:
                found.append(f"{h.ecc_uncorrected - g.ecc_uncorrected} uncorrectable ECC errors "
                             f"(volatile count {g.ecc_uncorrected} -> {h.ecc_uncorrected})")
                g.ecc_uncorrected = h.ecc_uncorrected
        if h.remapped_rows_failed and not any(f.startswith("row remapping failed") for f in g.faults):
            found.append("row remapping failed (no spare rows left: its memory cannot be repaired)")
        if not found:
            return []
        refresh = bool(g.faults)
        g.faults.extend(found)
        place, data = self.where(self.run, record.rank, g)
        summary = (f"drain {place}: {'; '.join(g.faults)}; restart the job without it "
                   f"(rank {record.rank}, step {record.step or 0})")
        event = firing(self.name, record.rank, record.step or 0, record.time, summary, "critical",
                       **data, xids=list(g.fault_xids), faults=list(g.faults),
                       ecc_uncorrected=h.ecc_uncorrected)
        event.refresh = refresh
        return [event]


class GpuDegraded(_GpuHealthBase, Detector[GpuDegradedSettings]):
    name = "gpu_degraded"
    record_types = ("start", "end", "gpu_health")
    Settings = GpuDegradedSettings

    def __init__(self, settings: GpuDegradedSettings, run: RunState) -> None:
        Detector.__init__(self, settings, run)
        _GpuHealthBase.__init__(self)

    def update(self, record: Record) -> list[Event]:
        kind = record.type
        if record.gpu_health is None and kind != "start" and kind != "end":
            return []  # the common case: no reading to judge, and no restart or end to forget a GPU for
        if kind == "start" or kind == "end":
            g = self.gpus.pop(record.rank, None)
            if g is not None and g.degraded is not None:
                why = "started again" if record.type == "start" else "ended"
                return [resolved(self.name, record.rank, record.step or 0, record.time,
                                 f"rank {record.rank} {why}; its GPU is no longer watched")]
            return []
        h = record.gpu_health
        s = self.settings
        if h is None:
            return []
        g = self.gpu(record.rank, h)
        now = record.time
        found = self._reasons(g, h, now) if s.enabled else []
        if not found:
            if g.degraded is None:
                return []
            g.degraded = None
            place, data = self.where(self.run, record.rank, g)
            return [resolved(self.name, record.rank, record.step or 0, now,
                             f"{place} is healthy again (rank {record.rank})", **data)]
        kinds = tuple(kind for kind, _ in found)
        if kinds == g.degraded:
            return []  # the same reasons with newer numbers: no churn (the open alert keeps the first ones)
        refresh = g.degraded is not None
        g.degraded = kinds
        reasons = [text for _, text in found]
        place, data = self.where(self.run, record.rank, g)
        summary = f"{place} is degraded: {'; '.join(reasons)} (rank {record.rank})"
        event = firing(self.name, record.rank, record.step or 0, now, summary, "warning", **data,
                       reasons=reasons, throttle_reasons=h.throttle_reasons, sm_clock_mhz=h.sm_clock_mhz,
                       sm_clock_max_mhz=h.sm_clock_max_mhz)
        event.refresh = refresh
        return [event]

    def _reasons(self, g: _Gpu, h: GpuHealth, now: float) -> list[tuple[str, str]]:
        """(kind, text) of each reason that holds now."""
        s = self.settings
        out: list[tuple[str, str]] = []
        slow = slowdown(h, s.clock_ratio)
        if slow is None:
            g.slow_since = None
        else:
            if g.slow_since is None:
                g.slow_since = now
            if now - g.slow_since >= s.throttle_seconds:
                out.append(("slow", f"{slow} for {now - g.slow_since:.0f} s"))
        start = now - s.window_seconds
        counts = _counts(h)
        readings = g.readings
        if readings is not None and None in counts:  # a counter not read: each counter on its own from here on
            for name, _, _ in COUNTERS:
                g.counters[name] = deque()
            for t, values in readings:
                for (name, _, _), value in zip(COUNTERS, values):
                    g.counters[name].append((t, value))
            readings = g.readings = None
        if readings is not None:
            # every reading so far had all five counts: one window of readings for them all (what five windows,
            # one per counter, would hold), and a reading with the counts of the window's base has no rise
            readings.append((now, counts))
            while len(readings) > 1 and readings[1][0] <= start:
                readings.popleft()  # keeps the newest reading at or before the window's start as the base
            since, base = readings[0]
            if counts != base:
                for (name, what, key), value, was in zip(COUNTERS, counts, base):
                    rise = value - was
                    if rise > 0 and rise >= getattr(s, key):  # (thresholds are >= 1: no rise is none)
                        out.append((name, f"{rise} {what} in {now - since:.0f} s"))
        else:
            counters = g.counters
            for (name, what, key), value in zip(COUNTERS, counts):
                if value is None:
                    continue
                dq = counters.get(name)
                if dq is None:
                    dq = counters[name] = deque()
                dq.append((now, value))
                while len(dq) > 1 and dq[1][0] <= start:
                    dq.popleft()  # keeps the newest reading at or before the window's start as the base
                rise = value - dq[0][1]
                if rise > 0 and rise >= getattr(s, key):
                    out.append((name, f"{rise} {what} in {now - dq[0][0]:.0f} s"))
        if h.remapped_rows_pending:
            out.append(("remap", "row remapping pending (reset the GPU when the job allows)"))
        if h.retired_pages_pending:
            out.append(("retire", "page retirement pending (reset the GPU when the job allows)"))
        if h.xids and h.xids != g.xids:
            for x in h.xids:
                if (x.xid, x.time) not in g.seen:
                    g.seen.add((x.xid, x.time))
                    if x.xid in s.xids:
                        g.recent_xids.append((x.time, x.xid))
            g.xids = h.xids
        for when, xid in g.recent_xids:
            if now - when < s.window_seconds:
                out.append((f"xid{xid}", f"XID {xid}, {XID_TEXT.get(xid, 'see the XID catalogue')}"))
        return out


def slowdown(h: GpuHealth, clock_ratio: float) -> str | None:
    """What slows this GPU in one reading ("HW slowdown, SM clock 705/1980 MHz"), or None.

    Every reading of every rank asks (gpu_degraded, straggler): a healthy one returns None without building
    a list or formatting the clocks (the words are made only for a GPU that is slowed)."""
    reasons = h.throttle_reasons or 0
    names = [text for bit, text in THROTTLE_BITS.items() if reasons & bit] if reasons & _SLOW_BITS else []
    clock, top = h.sm_clock_mhz, h.sm_clock_max_mhz
    if not names and clock is not None and top and not reasons & GPU_IDLE and clock < clock_ratio * top:
        names.append("clocks down")
    if not names:
        return None
    words = ", ".join(names)
    return f"{words}, SM clock {clock:.0f}/{top:.0f} MHz" if clock is not None and top else words
