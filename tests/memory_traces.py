"""Generated memory telemetry for the memory detectors' tests and benchmarks (seeded, deterministic).

A shape is a function (t seconds since start, rng) -> bytes; shapes add up.
``host_trace`` and ``gpu_trace`` turn per-rank shapes into Records in time
order, as a rank would send them.
"""

from __future__ import annotations

import math
import random
from typing import Callable

from trainhealth.record import Record, from_obj

Shape = Callable[[float, random.Random], float]
MB = 1e6
GiB = float(1 << 30)
MiB = float(1 << 20)
T0 = 1_700_000_000.0


def const(v: float) -> Shape:
    return lambda t, r: v


def noise(sd: float) -> Shape:
    return lambda t, r: r.gauss(0.0, sd)


def warmup(amount: float, tau: float) -> Shape:
    """Growth that saturates: amount * (1 - exp(-t / tau))."""
    return lambda t, r: amount * (1.0 - math.exp(-t / tau))


def linear(per_hour: float, start: float = 0.0, stop: float = math.inf) -> Shape:
    return lambda t, r: per_hour * (min(t, stop) - start) / 3600.0 if t > start else 0.0


def staircase(step: float, period: float, start: float = 0.0) -> Shape:
    """A step up every period that never comes back."""
    return lambda t, r: step * math.floor((t - start) / period) if t > start else 0.0


def sawtooth(amount: float, period: float) -> Shape:
    """Grows by ``amount`` over each period, then falls back (DataLoader workers restarting)."""
    return lambda t, r: amount * ((t % period) / period)


def spikes(amount: float, every: float, length: float) -> Shape:
    """Short bursts (a checkpoint being written, an eval pass)."""
    return lambda t, r: amount if (t % every) < length else 0.0


def total(*shapes: Shape) -> Shape:
    return lambda t, r: sum(s(t, r) for s in shapes)


def host_trace(ranks: dict[int, Shape], hours: float, every: float = 10.0, *,
               machine_bytes: float = 64e9, other_bytes: float = 8e9,
               available: Shape | None = None, seed: int = 0, run: str = "host-run",
               host: str | None = "node-a", starts: bool = True, limit: float | None = None,
               report_available: bool = True, cgroup_other: float | None = None,
               ends: dict[int, float] | None = None) -> list[Record]:
    """Samples every ``every`` s with host_mem_bytes per rank; available = machine - all ranks - other
    (or ``available`` when given). One step per second of record time. ``limit``: every rank reports
    it as ``host_mem_limit_bytes`` (a shared cgroup limit); ``report_available=False`` leaves the
    machine's fields out. ``cgroup_other``: every rank also reports the cgroup's usage as the kernel states it
    (``host_mem_cgroup_bytes``: all ranks plus this much of other memory in it). ``ends``: rank -> seconds
    at which it sends an ``end`` record and stops."""
    rng = random.Random(seed)
    out: list[Record] = []
    if starts:
        out += [from_obj({"type": "start", "run": run, "rank": k, "time": T0, "host": host,
                          "world_size": len(ranks)}) for k in ranks]
    n = int(hours * 3600 / every)
    for i in range(1, n + 1):
        t = i * every
        values = {k: max(0.0, shape(t, rng)) for k, shape in ranks.items()}
        for k, at in (ends or {}).items():
            if at <= t and k in values:
                del values[k]
                if at > t - every:
                    out.append(from_obj({"type": "end", "run": run, "rank": k, "time": T0 + at, "step": int(at)}))
        avail = available(t, rng) if available else machine_bytes - other_bytes - sum(values.values())
        for k, v in values.items():
            obj = {"run": run, "rank": k, "time": T0 + t, "step": int(t), "host_mem_bytes": v}
            if report_available:
                obj.update(host_mem_total_bytes=machine_bytes, host_mem_available_bytes=max(0.0, avail))
            if limit is not None:
                obj["host_mem_limit_bytes"] = limit
            if cgroup_other is not None:
                obj.update(host_mem_cgroup="/sys/fs/cgroup/job", host_mem_cgroup_bytes=min(
                    limit or math.inf, sum(values.values()) + cgroup_other))
            out.append(from_obj(obj))
    return out


def gpu_trace(ranks: dict[int, Shape], steps: int, *, total_bytes: float = 80 * GiB,
              seconds_per_step: float = 0.5, every: int = 1, field: str = "gpu_mem_peak_bytes",
              seed: int = 0, run: str = "gpu-run") -> list[Record]:
    """Samples every ``every`` steps; shapes take the *step* as their t. Peak capped at the total."""
    rng = random.Random(seed)
    out: list[Record] = [from_obj({"type": "start", "run": run, "rank": k, "time": T0,
                                   "world_size": len(ranks)}) for k in ranks]
    for step in range(every, steps + 1, every):
        for k, shape in ranks.items():
            v = min(total_bytes, max(0.0, shape(step, rng)))
            out.append(from_obj({"run": run, "rank": k, "time": T0 + step * seconds_per_step,
                                 "step": step, field: v, "gpu_mem_total_bytes": total_bytes}))
    return out
