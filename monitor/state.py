"""In-memory per-run, per-rank state: what the status API shows and detectors may read.

Bounded: one RankState per rank (latest values, and the last few hundred charted values for the
live page: history.py), a few start records per run. Detectors keep their own bounded windows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import msgspec

from .history import RankHistory
from .record import NUMBER_FIELDS, Record

SAMPLE_VALUE_FIELDS = NUMBER_FIELDS[:-1] + ("batch_size", "world_size", "host_mem_oom_kills",
                                            "host_mem_max_events", "host_mem_high_events")  # without reference_lr


def _fold_code(fields: tuple[str, ...]) -> Callable[[Record, dict[str, float]], None]:
    """``latest[name] = rec.<name>`` for each of ``fields`` the record carries (not None), written out one
    field a line: the ingest hot path (every sample). A loop of ``getattr(rec, name)`` over the 23 names cost
    about 1.9 us a sample, these plain attribute reads (which Python specializes) about 1.0 us. The code is
    made from the one list of names, so it cannot drift from it."""
    lines = [f"    if (v := rec.{name}) is not None:\n        latest[{name!r}] = v\n" for name in fields]
    namespace: dict[str, Any] = {}
    exec(compile("def fold(rec, latest):\n" + "".join(lines), f"<state.fold {len(fields)} fields>", "exec"),
         namespace)
    fold: Callable[[Record, dict[str, float]], None] = namespace["fold"]
    return fold


_fold_sample_values = _fold_code(SAMPLE_VALUE_FIELDS)
MAX_STARTS_KEPT = 16
MAX_METRICS_KEPT = 256  # per rank: one record may carry any number of names


@dataclass(slots=True)
class RankState:
    rank: int
    last_time: float = 0.0  # newest record time of any type
    last_step: int = -1  # highest step seen
    last_sample_time: float | None = None
    last_heartbeat_time: float | None = None
    records: int = 0
    latest: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float | None] = field(default_factory=dict)
    host: str | None = None
    pid: int | None = None
    ended: bool = False
    end_status: str | None = None  # its latest ``end`` record's status ("completed", "failed"), if any
    end_step: int | None = None  # and that record's step
    last_oom: dict[str, Any] | None = None
    phase: str | None = None  # what its training thread does, as its newest heartbeat or sample says
    phase_time: float | None = None  # when that phase began
    phase_seen: float = 0.0  # record time of the heartbeat or sample that said so
    loss_nonfinite_step: int | None = None  # first step with a NaN/Inf loss since its start (the fleet's NaN rule)
    history: RankHistory = field(default_factory=RankHistory)  # the live page's recent window (bounded)
    gpu_health: dict[str, Any] | None = None  # its GPU's newest NVML reading, with the record's "time"

    def apply(self, rec: Record) -> None:
        # every record of ingest and replay comes here: the record's fields are read once, into locals
        self.records += 1
        t, kind, step = rec.time, rec.type, rec.step
        if t > self.last_time:
            self.last_time = t
        if (kind == "sample" or kind == "heartbeat") and t >= self.phase_seen:
            self.phase_seen = t  # no phase on the newest one: none (an older client, or between phases)
            phase = self.phase = rec.phase
            self.phase_time = rec.phase_time if phase is not None else None
        if step is not None and step > self.last_step:
            self.last_step = step
        health = rec.gpu_health
        if health is not None and (self.gpu_health is None or t >= self.gpu_health["time"]):
            self.gpu_health = {**msgspec.to_builtins(health), "time": t}  # plain: JSON, pickle
        if kind == "sample":
            loss = rec.loss
            if loss is not None and loss - loss != 0.0 and step is not None:  # NaN or infinite
                if self.loss_nonfinite_step is None or step < self.loss_nonfinite_step:
                    self.loss_nonfinite_step = step
            last = self.last_sample_time
            if last is None or t >= last:
                self.last_sample_time = t
                self.history.add(rec)
                _fold_sample_values(rec, self.latest)  # each of SAMPLE_VALUE_FIELDS the sample carries
                if rec.metrics:
                    metrics = self.metrics
                    if len(metrics) + len(rec.metrics) <= MAX_METRICS_KEPT:
                        metrics.update(rec.metrics)
                    else:  # keep the names already known, and new ones while there is room
                        for name, value in rec.metrics.items():
                            if name in metrics or len(metrics) < MAX_METRICS_KEPT:
                                metrics[name] = value
            self.ended = False
        elif kind == "heartbeat":
            if self.last_heartbeat_time is None or t > self.last_heartbeat_time:
                self.last_heartbeat_time = t
            self.ended = False
        elif kind == "start":
            self.phase = self.phase_time = None
            self.loss_nonfinite_step = None
            self.host = rec.host or self.host
            self.pid = rec.pid if rec.pid is not None else self.pid
            self.ended = False
        elif kind == "end":
            launcher_after_clean = (self.ended and self.end_status != "failed" and rec.error is None
                                    and (rec.exit_code is not None or rec.signal is not None))
            if not launcher_after_clean:  # an exit code after its own clean end is its choice (a stop: exit 3)
                self.end_status = rec.status
                self.end_step = rec.step
            self.ended = True
        elif kind == "oom":
            self.last_oom = {
                "step": rec.step,
                "time": rec.time,
                "message": rec.message,
                "detail": rec.detail,
                **{
                    f: getattr(rec, f)
                    for f in ("gpu_mem_allocated_bytes", "gpu_mem_reserved_bytes",
                              "gpu_mem_peak_bytes", "gpu_mem_total_bytes")
                    if getattr(rec, f) is not None
                },
            }


@dataclass(slots=True)
class RunState:
    run: str
    ranks: dict[int, RankState] = field(default_factory=dict)
    starts: list[Record] = field(default_factory=list)  # first start, then the latest ones
    clock: float = 0.0  # newest record time seen in this run
    clock_wall: float = 0.0  # wall time when clock last advanced (server only)
    last_wall: float = 0.0  # wall time of the newest arrival (server only; for expiry)
    last_tick: float = 0.0
    records: int = 0
    # what detectors of the run share (detectors/helpers/divergence_story.py)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def first_start(self) -> Record | None:
        return self.starts[0] if self.starts else None

    @property
    def last_start(self) -> Record | None:
        return self.starts[-1] if self.starts else None

    @property
    def ended(self) -> bool:
        return bool(self.ranks) and all(r.ended for r in self.ranks.values())

    def add_start(self, rec: Record) -> None:
        if len(self.starts) >= MAX_STARTS_KEPT:
            del self.starts[1]  # keep the first start: it is the run's own reference
        self.starts.append(rec)
