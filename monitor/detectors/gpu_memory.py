"""gpu_oom_risk and gpu_oom: a GPU about to run out of memory, and one that did.

gpu_oom_risk, per rank: the GPU memory that matters is the peak
(``gpu_mem_peak_bytes``, peak allocated since the previous sample; when a
client does not send it, ``gpu_mem_reserved_bytes``). It is summarised as the
maximum per bucket (at least ``bucket_steps`` steps and ``bucket_seconds``
seconds) in a ring of ``window_buckets``. At each closed bucket, over the
buckets after ``warmup_steps``:

- rate: Theil-Sen slope of the bucket maxima against the step (bytes/step);
- steady: the rise is significant (Mann-Kendall z >= ``min_trend_z``: noise
  of any shape, like variable-length batches, scores about N(0, 1)) and large
  (rate x window >= ``min_rise_fraction`` of the device, the minimum rise); the
  level (median) of the last third of the window is above the middle third's
  by a third of the minimum rise, and that recent rise is at least
  ``decel_ratio`` x the rise before it (warmup growth that flattens fails);
- fire when steady and either the peak is within ``near_fraction`` of the
  device, or the forecast (headroom / rate) reaches capacity within
  ``horizon_steps`` steps or ``horizon_seconds`` seconds.

Two more causes, same alert (``cause``): **fast**, a leak that fills the GPU in seconds (the
last ``fast_samples`` samples each higher, the newest ``fast_min_rise_fraction`` of the device above
anything before them, capacity within ``fast_horizon_seconds``), judged per sample from a quarter of
the warmup on; **fragmentation**, the allocator's reserved memory climbing to within
``near_fraction`` of the device while the peak allocated stays flat, with
``fragmentation_fraction`` of it reserved but unallocated (the summary gives the fix,
``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``). Trend alerts have cause "trend".

A GPU filled to a high but constant level makes no new highs and its slope is
flat, so it stays quiet. The alert resolves when the last third's level is no
higher than the middle third's or the slope is no longer positive (the trend flattened), and when the
rank restarts.

gpu_oom, per rank: an ``oom`` record (the client's caught
``torch.cuda.OutOfMemoryError``); critical, quoting PyTorch's message whole. The run state keeps the record's
allocator summary (``RankState.last_oom``), which the status API serves. It
resolves when the rank restarts, or when it has trained ``resolve_after_steps``
further steps without another OOM (the job caught it and went on).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from statistics import median

from ..config.rules import flag, fraction, positive, whole
from ..events import Event, firing, resolved
from ..record import Record
from ..state import RunState
from .base import Detector
from .helpers.trend import Ring, trend_test

GiB = float(1 << 30)
MiB = float(1 << 20)
_INF = math.inf
_NINF = -math.inf


@dataclass(kw_only=True, slots=True)
class GpuOomRiskSettings:
    enabled: bool = True
    near_fraction: float = 0.95  # a rising peak above this share of the device fires at once
    horizon_steps: int = 1000  # fire when the forecast reaches capacity within this many steps
    horizon_seconds: float = 1800.0  # ... or within this many seconds
    min_rise_fraction: float = 0.01  # the trend must add this share of the device over the window
    near_min_rise_fraction: float = 0.005  # ... or this share when the peak is already near capacity
    decel_ratio: float = 0.5  # the last third must rise >= this x the third before it
    min_trend_z: float = 4.0  # Mann-Kendall z of the bucket maxima (noise of any shape: ~N(0, 1))
    warmup_steps: int = 100  # steps after a (re)start that are not judged
    bucket_steps: int = 10  # one maximum per bucket of at least this many steps ...
    bucket_seconds: float = 10.0  # ... and at least this many seconds
    window_buckets: int = 48
    min_buckets: int = 12  # buckets needed before the first judgement
    fast_samples: int = 8  # fast path: this many samples in a row, each higher than the one before ...
    fast_min_rise_fraction: float = 0.05  # ... adding this share of the device ...
    fast_horizon_seconds: float = 30.0  # ... reach capacity within this many seconds at their rate
    fragmentation_fraction: float = 0.1  # reserved but not allocated: this share of the device is fragmentation

    def __post_init__(self) -> None:
        section = "detectors.gpu_oom_risk"
        flag(self, section, "enabled")
        fraction(self, section, "near_fraction", "min_rise_fraction", "near_min_rise_fraction",
                 "decel_ratio", "fast_min_rise_fraction", "fragmentation_fraction")
        positive(self, section, "horizon_seconds", "bucket_seconds", "min_trend_z", "fast_horizon_seconds")
        whole(self, section, "fast_samples", minimum=3, maximum=16)
        whole(self, section, "horizon_steps", "bucket_steps", minimum=1)
        whole(self, section, "warmup_steps", minimum=0)
        whole(self, section, "min_buckets", minimum=6)
        whole(self, section, "window_buckets", minimum=self.min_buckets)


class _Gpu:
    """One rank's bucket maxima of the GPU peak, and its alert state. Bounded."""

    __slots__ = ("ring", "hi", "lo", "first_step", "b_step", "b_time", "b_max", "b_last", "sps", "prev_step",
                 "prev_time", "open", "recent", "rising", "reserved", "b_reserved", "cause", "top", "settings",
                 "fast_from")

    def __init__(self, s: GpuOomRiskSettings, step: int, time: float) -> None:
        size = s.window_buckets
        self.settings = s  # what ``fast_from`` was computed with (a reload may change warmup_steps)
        self.fast_from = step + s.warmup_steps // 4  # the fast path judges from this step on
        self.ring = Ring(size)  # (last step of the bucket, maximum)
        self.hi = self.lo = math.nan  # the highest and lowest maximum in the ring
        self.reserved = Ring(size)  # (last step of the bucket, maximum reserved): fragmentation
        self.b_reserved = -math.inf
        self.recent: deque[tuple[int, float, float]] = deque(maxlen=16)  # (step, time, value): the fast path
        self.rising = 0  # how many of the newest values in ``recent`` are each higher than the one before
        self.cause = ""  # what opened the alert: "trend", "fast" or "fragmentation"
        # the highest sample before the newest rising run of ``recent`` (kept as runs end, not per sample): when
        # the last ``fast_samples`` rose, the highest of all before them, up to the first of them
        self.top = -math.inf
        self.first_step = step
        self.b_step, self.b_time, self.b_max, self.b_last = step, time, -math.inf, step
        self.sps = 0.0  # seconds per step (smoothed)
        self.prev_step, self.prev_time = step, time
        self.open = False

    def close(self, step: int, time: float) -> None:
        ring, v = self.ring, self.b_max
        evicted = ring.values[ring.head] if ring.count == ring.size else None
        ring.append(self.b_last, v)
        if ring.count == 1:
            self.hi = self.lo = v
        elif evicted is not None and (evicted == self.hi or evicted == self.lo):  # an extreme left the ring
            self.hi, self.lo = max(ring.values), min(ring.values)
        elif v > self.hi:
            self.hi = v
        elif v < self.lo:
            self.lo = v
        self.reserved.append(self.b_last, self.b_reserved)
        self.b_step, self.b_time, self.b_max, self.b_reserved = step, time, -math.inf, -math.inf

    def fast(self, total: float, s: GpuOomRiskSettings) -> tuple[float, float] | None:
        """(bytes per second, seconds to capacity) when the last ``fast_samples`` samples each rose, the
        newest ``fast_min_rise_fraction`` of the device above anything seen before them (jitter makes no
        such new highs), evenly (the later half at least half as fast as the earlier), and reach capacity
        within ``fast_horizon_seconds``: a leak that fills a GPU in seconds, before any bucket could be
        judged."""
        n = s.fast_samples
        if len(self.recent) < n:
            return None
        pts = list(self.recent)[-n:]
        if any(b[2] <= a[2] for a, b in zip(pts, pts[1:])):
            return None
        if pts[-1][2] - max(self.top, pts[0][2]) < s.fast_min_rise_fraction * total:
            return None
        rise, seconds = pts[-1][2] - pts[0][2], pts[-1][1] - pts[0][1]
        half = n // 2
        early, late = pts[half][2] - pts[0][2], pts[-1][2] - pts[-1 - half][2]
        if rise < s.fast_min_rise_fraction * total or seconds <= 0 or late < 0.5 * early:
            return None
        rate = rise / seconds
        left = max(0.0, total - pts[-1][2]) / rate
        return (rate, left) if left <= s.fast_horizon_seconds else None


class GpuOomRisk(Detector[GpuOomRiskSettings]):
    name = "gpu_oom_risk"
    record_types = ("start", "sample", "end")
    Settings = GpuOomRiskSettings

    def __init__(self, settings: GpuOomRiskSettings, run: RunState) -> None:
        super().__init__(settings, run)
        self.ranks: dict[int, _Gpu] = {}

    def update(self, rec: Record) -> list[Event]:
        # the hot path (every sample): plain comparisons for finiteness, the bucket fold inline, and the
        # checks that cost something only when a cheap bound leaves them a say
        s: GpuOomRiskSettings = self.settings
        if not s.enabled:
            return []
        kind = rec.type
        if kind != "sample":
            if kind == "start" or kind == "end":
                gpu = self.ranks.pop(rec.rank, None)
                if gpu is not None and gpu.open:
                    why = "restarted" if kind == "start" else "ended"
                    return [resolved(self.name, rec.rank, rec.step or 0, rec.time,
                                     f"rank {rec.rank} {why}; its GPU memory history starts over")]
            return []
        step = rec.step
        if step is None:
            return []
        value = rec.gpu_mem_peak_bytes
        if value is None or not _NINF < value < _INF:
            value = rec.gpu_mem_reserved_bytes
            if value is None or not _NINF < value < _INF:
                return []
        time = rec.time
        gpu = self.ranks.get(rec.rank)
        if gpu is None or gpu.settings is not s:  # new, or reconfigured
            if gpu is None or gpu.ring.size != s.window_buckets:
                gpu = self.ranks[rec.rank] = _Gpu(s, step, time)
            else:
                gpu.settings, gpu.fast_from = s, gpu.first_step + s.warmup_steps // 4
        reserved = rec.gpu_mem_reserved_bytes
        if reserved is not None and reserved > gpu.b_reserved and reserved < _INF:
            gpu.b_reserved = reserved
        if step >= gpu.fast_from and not gpu.open:
            recent = gpu.recent
            last = recent[-1] if recent else None
            if last is None or step > last[0]:
                if last is not None and value > last[2]:
                    gpu.rising += 1
                else:  # a rising run ends (at its highest sample, the one before this): it is history now
                    gpu.rising = 0
                    if last is not None and last[2] > gpu.top:
                        gpu.top = last[2]
                recent.append((step, time, value))
                n = s.fast_samples
                if gpu.rising >= n - 1 and len(recent) >= n:  # the fast path needs n samples, each higher
                    total = self.run.ranks[rec.rank].latest.get("gpu_mem_total_bytes")
                    if total is not None and 0 < total < _INF:
                        found = gpu.fast(total, s)
                        if found is not None:
                            return self._fire_fast(rec, gpu, total, value, *found)
        # fold the sample into the open bucket (smoothed seconds per step, the bucket's maximum and last step)
        if step > gpu.prev_step and time > gpu.prev_time:
            per = (time - gpu.prev_time) / (step - gpu.prev_step)
            gpu.sps = per if gpu.sps == 0.0 else 0.8 * gpu.sps + 0.2 * per
        gpu.prev_step, gpu.prev_time = step, time
        if value > gpu.b_max:
            gpu.b_max = value
        if step > gpu.b_last:
            gpu.b_last = step
        if step - gpu.b_step < s.bucket_steps or time - gpu.b_time < s.bucket_seconds:
            return []
        gpu.close(step, time)
        total = self.run.ranks[rec.rank].latest.get("gpu_mem_total_bytes")
        if total is None or not 0 < total < _INF:
            return []
        if not gpu.open:
            # fragmentation needs the newest reserved level within near_fraction of the device
            if gpu.reserved.last()[1] >= s.near_fraction * total:
                fragmented = self._fragmentation(rec, gpu, total, s)
                if fragmented:
                    return fragmented
            return self._judge(rec, gpu, total, s)
        if gpu.cause == "fragmentation":
            level = gpu.reserved.last()[1]
            if level < s.near_fraction * total - s.fragmentation_fraction * total:
                gpu.open, gpu.cause = False, ""
                return [resolved(self.name, rec.rank, rec.step or 0, rec.time,
                                 f"GPU memory reserved by rank {rec.rank}'s allocator fell back to "
                                 f"{level / GiB:.1f} of {total / GiB:.1f} GiB")]
            return []
        return self._judge(rec, gpu, total, s)

    def _fire_fast(self, rec: Record, gpu: _Gpu, total: float, current: float, rate: float,
                   left: float) -> list[Event]:
        gpu.open, gpu.cause = True, "fast"
        summary = (f"GPU memory peak of rank {rec.rank} rises {rate / GiB:.2f} GiB/s (now {current / GiB:.1f} of "
                   f"{total / GiB:.1f} GiB, {100 * current / total:.0f}%); at this rate it reaches capacity in "
                   f"~{left:.0f} s, look for tensors kept across steps")
        return [firing(self.name, rec.rank, rec.step or 0, rec.time, summary, "warning", cause="fast",
                       rate_gib_per_second=round(rate / GiB, 3), peak_bytes=current, total_bytes=total,
                       fraction=round(current / total, 4), seconds_to_oom=round(left, 1))]

    def _fragmentation(self, rec: Record, gpu: _Gpu, total: float, s: GpuOomRiskSettings) -> list[Event]:
        """The allocator's reserved memory climbed to within ``near_fraction`` of the device while the
        peak allocated stayed flat, and ``fragmentation_fraction`` of the device is reserved but not
        allocated: the next large allocation may find no block big enough (fragmentation)."""
        since = gpu.first_step + s.warmup_steps
        res = gpu.reserved.items(since=since)
        peaks = gpu.ring.items(since=since)
        if len(res) < s.min_buckets or len(peaks) < s.min_buckets:
            return []
        k = len(res) // 3
        level, peak = res[-1][1], max(p[1] for p in peaks[-k:])
        if not (level >= s.near_fraction * total and level - peak >= s.fragmentation_fraction * total):
            return []
        climbed = level - median(v for _, v in res[:k]) >= s.min_rise_fraction * total
        flat = peak - median(v for _, v in peaks[:k]) < s.min_rise_fraction * total
        if not (climbed and flat):
            return []
        gpu.open, gpu.cause = True, "fragmentation"
        summary = (f"GPU memory of rank {rec.rank}: the allocator has reserved {level / GiB:.1f} of "
                   f"{total / GiB:.1f} GiB ({100 * level / total:.0f}%) while the peak allocated stays at "
                   f"{peak / GiB:.1f} GiB: {(level - peak) / GiB:.1f} GiB reserved but unallocated is fragmentation, "
                   f"and the next large allocation may fail; set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")
        return [firing(self.name, rec.rank, rec.step or 0, rec.time, summary, "warning", cause="fragmentation",
                       reserved_bytes=level, peak_bytes=peak, total_bytes=total,
                       fraction=round(level / total, 4), fix="PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")]

    def _judge(self, rec: Record, gpu: _Gpu, total: float, s: GpuOomRiskSettings) -> list[Event]:
        if not gpu.open:
            # cheap bound first (most buckets of most runs stop here): to fire, the last third's median must
            # be half the smaller minimum rise above the first third's, so the window's range at least that
            if gpu.hi - gpu.lo < 0.5 * (min(s.near_min_rise_fraction, s.min_rise_fraction) * total):
                return []
        pts = gpu.ring.items(since=gpu.first_step + s.warmup_steps)
        if len(pts) < s.min_buckets:
            return []
        pts = pts[len(pts) % 3:]  # equal thirds
        xs, vs = [p[0] for p in pts], [p[1] for p in pts]
        k = len(vs) // 3
        a, b, c = median(vs[:k]), median(vs[k: 2 * k]), median(vs[2 * k:])  # the thirds' levels
        older, recent = b - a, c - b
        step = rec.step or 0
        # the trend test (~50 us: all pairs of points) runs only when the cheap conditions leave it a say
        if gpu.open:
            if recent <= 0 or trend_test(xs, vs, max_points=24)[0] <= 0:
                gpu.open, gpu.cause = False, ""
                return [resolved(self.name, rec.rank, step, rec.time,
                                 f"GPU memory peak of rank {rec.rank} stopped rising "
                                 f"({max(vs[-2:]) / GiB:.1f} of {total / GiB:.1f} GiB)")]
            return []
        current = max(vs[-2:])
        near = current >= s.near_fraction * total
        min_rise = (s.near_min_rise_fraction if near else s.min_rise_fraction) * total
        if not (c - a >= 0.5 * min_rise and recent >= min_rise / 3 and recent >= s.decel_ratio * older):
            return []  # flat or slowing: not steady, whatever the trend test says
        rate, z = trend_test(xs, vs, max_points=24)  # bytes per step; Mann-Kendall z
        steady = z >= s.min_trend_z and rate * (xs[-1] - xs[0]) >= min_rise
        if not steady:
            return []
        headroom = max(0.0, total - current)
        steps_left = headroom / rate
        seconds_left = steps_left * gpu.sps
        soon = steps_left <= s.horizon_steps or (gpu.sps > 0 and seconds_left <= s.horizon_seconds)
        if not (near or soon):
            return []
        gpu.open, gpu.cause = True, "trend"
        summary = (f"GPU memory peak of rank {rec.rank} rises {rate / MiB:.1f} MiB/step "
                   f"(now {current / GiB:.1f} of {total / GiB:.1f} GiB, {100 * current / total:.0f}%); "
                   f"at this rate it reaches capacity in ~{steps_left:.0f} steps")
        if gpu.sps > 0:
            summary += f" (~{seconds_left / 60:.0f} min)" if seconds_left >= 90 else f" (~{seconds_left:.0f} s)"
        summary += ", look for tensors kept across steps"
        return [firing(self.name, rec.rank, step, rec.time, summary, "warning",
                       rate_mib_per_step=round(rate / MiB, 2), peak_bytes=current,
                       total_bytes=total, fraction=round(current / total, 4),
                       steps_to_oom=round(steps_left),
                       seconds_to_oom=round(seconds_left, 1) if gpu.sps > 0 else None)]


@dataclass(kw_only=True, slots=True)
class GpuOomSettings:
    enabled: bool = True
    resolve_after_steps: int = 100  # steps trained after the OOM without another one

    def __post_init__(self) -> None:
        flag(self, "detectors.gpu_oom", "enabled")
        whole(self, "detectors.gpu_oom", "resolve_after_steps", minimum=1)


def _gib(value: float | None) -> str:
    return "?" if value is None else f"{value / GiB:.1f} GiB"


class GpuOom(Detector[GpuOomSettings]):
    name = "gpu_oom"
    record_types = ("start", "sample", "oom")
    Settings = GpuOomSettings

    def __init__(self, settings: GpuOomSettings, run: RunState) -> None:
        super().__init__(settings, run)
        self.open: dict[int, int] = {}  # rank -> step of its last OOM

    def update(self, rec: Record) -> list[Event]:
        if not self.open and rec.type != "oom":
            return []  # the common case: no OOM open and none now, so nothing can fire or resolve
        s: GpuOomSettings = self.settings
        if not s.enabled:
            return []
        step = rec.step or 0
        if rec.type == "oom":
            self.open[rec.rank] = step
            # PyTorch's message whole (bounded by the record's limit): its end says "reserved but
            # unallocated ... expandable_segments:True" when fragmentation is the cause, which is the fix
            message = " ".join((rec.message or "").split()) or "out of memory"
            summary = (f"rank {rec.rank} ran out of GPU memory at step {step}: {message}; "
                       f"peak {_gib(rec.gpu_mem_peak_bytes)}, reserved {_gib(rec.gpu_mem_reserved_bytes)}, "
                       f"allocated {_gib(rec.gpu_mem_allocated_bytes)} of {_gib(rec.gpu_mem_total_bytes)}")
            reserved, allocated = rec.gpu_mem_reserved_bytes, rec.gpu_mem_allocated_bytes
            total = rec.gpu_mem_total_bytes
            if (reserved is not None and allocated is not None and total and reserved - allocated >= 0.1 * total
                    and "expandable_segments" not in message):
                summary += (f"; {(reserved - allocated) / GiB:.1f} GiB reserved but unallocated is fragmentation: "
                            f"set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")
            summary += f"; the allocator summary is in GET /v1/runs/{self.run.run}"
            return [firing(self.name, rec.rank, step, rec.time, summary, "critical",
                           message=rec.message, has_detail=rec.detail is not None,
                           **{f: getattr(rec, f) for f in ("gpu_mem_allocated_bytes",
                              "gpu_mem_reserved_bytes", "gpu_mem_peak_bytes", "gpu_mem_total_bytes")})]
        if rec.rank not in self.open:
            return []
        if rec.type == "start":
            del self.open[rec.rank]
            return [resolved(self.name, rec.rank, step, rec.time,
                             f"rank {rec.rank} restarted after running out of GPU memory")]
        oom_step = self.open[rec.rank]
        if rec.type == "sample" and step >= oom_step + s.resolve_after_steps:
            del self.open[rec.rank]
            return [resolved(self.name, rec.rank, step, rec.time,
                             f"rank {rec.rank} trained {step - oom_step} steps since its GPU ran out "
                             f"of memory at step {oom_step}")]
        return []
