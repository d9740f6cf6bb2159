"""Generated traces of synchronous data-parallel jobs, for the liveness and straggler detectors.

``ddp_job`` simulates what the telemetry client sends: a ``start`` per rank, a
sample per rank when a step completes (all ranks together, a few ms apart, as
the all-reduce releases them), and heartbeats every ``heartbeat`` seconds from
a background thread carrying the rank's last completed step. Failures are
described by what each rank reports: ``last_step`` (a rank that stops
reporting steps) and ``silent_at`` (a rank whose records stop entirely).
``feed`` runs records through the real Pipeline the way the server does
(wall time = record time, a timer tick every second).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable

from trainhealth.alerts import Alert
from trainhealth.config import default_detector_settings
from trainhealth.pipeline import Pipeline
from trainhealth.record import Record, from_obj

T0 = 1_000_000.0
RUN = "job"


@dataclass
class Job:
    records: list[Record]
    done: dict[int, float] = field(default_factory=dict)  # step -> time all ranks completed it

    def t(self, step: int) -> float:
        return self.done[step]


def ddp_job(ranks: int = 2, steps: int = 100, step_seconds: float | Callable[[int], float] = 0.5,
            pauses: dict[int, float] | None = None, heartbeat: float | None = 5.0,
            last_step: dict[int, int] | None = None, silent_at: dict[int, float] | None = None,
            until: float | None = None, startup: float = 5.0, end: bool | list[int] = False,
            data_time: Callable[[int, int], float | None] | None = None,
            step_offset: Callable[[int, int], float] | None = None,
            start: bool = True, world_size: int | None = None, t0: float = T0,
            first_step: int = 1) -> Job:
    """Records of one job, sorted by time.

    step_seconds: per-step time (or f(step)); pauses: extra seconds before a step
    (a checkpoint save after the previous one); last_step: rank -> the last step
    it reports (its samples and heartbeats stop advancing there); silent_at:
    rank -> time its records stop; until: heartbeats go on until then (default:
    the last step); end: every rank (or the listed ranks) sends ``end`` after the
    last step; data_time(rank, step); step_offset(rank, step): when that rank's
    sample is taken after the step completes (default 1 ms per rank).
    """
    pauses = pauses or {}
    last_step = last_step or {}
    silent_at = silent_at or {}
    out: list[dict[str, Any]] = []
    if start:
        for r in range(ranks):
            out.append({"type": "start", "run": RUN, "rank": r, "time": t0 + 0.01 * r,
                        "world_size": world_size or ranks, "batch_size": 32, "lr": 0.1})
    done: dict[int, float] = {first_step - 1: t0 + startup}
    t = t0 + startup
    for k in range(first_step, steps + 1):
        t += (step_seconds(k) if callable(step_seconds) else step_seconds) + pauses.get(k, 0.0)
        done[k] = t
    reported: dict[int, list[tuple[float, int]]] = {}
    for r in range(ranks):
        mine = reported[r] = [(t0 + startup, first_step - 1)]
        for k in range(first_step, min(steps, last_step.get(r, steps)) + 1):
            when = done[k] + (step_offset(r, k) if step_offset else 0.001 * r)
            mine.append((when, k))
            rec: dict[str, Any] = {"run": RUN, "rank": r, "time": when, "step": k, "loss": 2.0,
                                   "step_time_seconds": done[k] - done[k - 1]}
            if data_time is not None:
                rec["data_time_seconds"] = data_time(r, k)
            out.append(rec)
    horizon = until if until is not None else done[steps]
    if heartbeat:
        for r in range(ranks):
            tt = t0 + heartbeat * (0.5 + 0.1 * r)
            mine, i = reported[r], 0
            while tt <= horizon:
                while i + 1 < len(mine) and mine[i + 1][0] <= tt:
                    i += 1
                out.append({"type": "heartbeat", "run": RUN, "rank": r, "time": tt, "step": mine[i][1]})
                tt += heartbeat
    if end:
        for r in (range(ranks) if end is True else end):
            out.append({"type": "end", "run": RUN, "rank": r, "time": done[steps] + 0.5,
                        "step": min(steps, last_step.get(r, steps))})
    out = [o for o in out if o["time"] < silent_at.get(o["rank"], math.inf)]
    out.sort(key=lambda o: o["time"])
    return Job([from_obj(o) for o in out], done)


def settings(**overrides: dict[str, Any]) -> dict[str, Any]:
    """Default detector settings with some replaced: settings(rank_stalled={"floor_seconds": 5})."""
    out = default_detector_settings()
    for name, values in overrides.items():
        out[name] = type(out[name])(**values)
    return out


def feed(records: list[Record], until: float | None = None, only: str | None = None,
         detector_settings: dict[str, Any] | None = None, timer: bool = True,
         refreshes: bool = False) -> list[Alert]:
    """Alert transitions, as the server makes them: one record per request, wall = record time,
    and (timer=True) a timer tick every second, continuing to ``until``. Each transition is a copy
    taken when it was made (an open alert is refreshed in place later: ``last_pipeline`` holds the latest).
    ``refreshes``: also the open alerts refreshed in place, as the server hands them to its sinks after each
    request and tick (``AlertBook.hand_off``), marked ``refreshed: True`` as replay(refreshes=True) marks them."""
    p = Pipeline(detector_settings or default_detector_settings())
    alerts: list[Alert] = []

    def handed(out: list[Alert]) -> None:
        if refreshes:
            out, refreshed = p.book.hand_off(out)
            for a in refreshed:
                a["refreshed"] = True
            alerts.extend(refreshed)
        alerts.extend(dict(a) for a in out)

    wall = records[0].time if records else 0.0
    for rec in records:
        while timer and wall + 1.0 < rec.time:
            wall += 1.0
            handed(p.tick_wall(wall))
        wall = max(wall, rec.time)
        handed(p.process([rec], wall=rec.time).alerts)
    while timer and until is not None and wall < until:
        wall += 1.0
        handed(p.tick_wall(wall))
    global last_pipeline
    last_pipeline = p
    return [a for a in alerts if only is None or a["alert"] == only]


last_pipeline: Pipeline | None = None  # the Pipeline of the latest feed(): its open alerts and findings


def brief(alerts: list[Alert]) -> list[tuple[str, str, int | None, int]]:
    return [(a["alert"], a["state"], a["rank"], a["step"]) for a in alerts]


def lognormal(rng: random.Random, mean: float, sigma: float) -> float:
    return mean * math.exp(rng.gauss(0.0, sigma) - sigma * sigma / 2)


def write_jsonl(path: Any, records: list[Record]) -> str:
    import json

    from trainhealth.record import to_obj

    with open(path, "w") as fh:
        for rec in records:
            fh.write(json.dumps(to_obj(rec)) + "\n")
    return str(path)


def shifted(records: list[Record], **changes: Any) -> list[Record]:
    """Copies of records with some fields replaced (e.g. a rank's records moved in time)."""
    import msgspec

    return [msgspec.structs.replace(r, **changes) for r in records]
