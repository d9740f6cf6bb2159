"""``trainhealth replay --jobs N``: the runs of a recording replayed in N processes at once.

Runs are independent in the pipeline (each has its own state and detectors; the alert book is keyed by run),
so the files of different runs can be replayed apart. Files are grouped by the run the flight recorder named
them after (``RUN.jsonl``, ``RUN.jsonl.1``, ``.gz``): each group goes whole to one process, which replays it
as ``trainhealth replay`` would. Each run's alerts are the serial replay's, in its order; the processes'
streams are merged by alert time. When the grouping does not hold (a run's records in two groups, or more
runs than ``limits.max_runs``, where the serial replay would refuse some), the whole recording is replayed
serially instead, so the answer never differs from one process's. This saves wall time on a many-run
post-mortem; the CPU per record is the same.
"""

from __future__ import annotations

import heapq
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any, Sequence

from . import jsonout
from .config import Settings
from .pipeline import Pipeline, replay
from .replay import ReadStats, read_files

_RECORDER_NAME = re.compile(r"^(.*?)\.jsonl(\.\d+)?(\.gz)?$")


@dataclass
class Part:
    """What one process found: its alerts and refresh lines in order, as (time, the JSON line written when it
    happened), its read counts, the runs it saw."""

    alerts: list[tuple[float, str]] = field(default_factory=list)
    stats: ReadStats = field(default_factory=ReadStats)
    runs: set[str] = field(default_factory=set)


def groups(files: Sequence[str]) -> list[list[str]]:
    """Files by the run in their name (any other name is a group of its own), in their given order."""
    by_run: dict[str, list[str]] = {}
    for path in files:
        m = _RECORDER_NAME.match(os.path.basename(path))
        key = m.group(1) if m else path
        by_run.setdefault(key, []).append(path)
    return list(by_run.values())


def replay_part(files: Sequence[str], settings: Settings, until: float | None) -> Part:
    part = Part()
    pipeline = Pipeline(settings.detectors, settings.limits, settings.server.tick_seconds)

    def seen(records: Any) -> Any:
        for rec in records:
            part.runs.add(rec.run)
            yield rec

    # a refresh line happened at its alert's latest event (last_time), not when the alert fired (time)
    part.alerts = [(a.get("last_time", a["time"]) if a.get("refreshed") else a["time"], jsonout.dumps(a))
                   for a in replay(seen(read_files(files, part.stats)), pipeline, until=until, refreshes=True)]
    return part


def replay_parallel(files: Sequence[str], settings: Settings, until: float | None, jobs: int) -> Part:
    """The alerts and counts of replaying ``files``, in up to ``jobs`` processes (see the module's doc)."""
    parts_of = groups(files)
    if jobs <= 1 or len(parts_of) <= 1:
        return replay_part(files, settings, until)
    shares: list[list[str]] = [[] for _ in range(min(jobs, len(parts_of)))]
    sizes = [0] * len(shares)
    for group in sorted(parts_of, key=lambda g: -sum(_size(p) for p in g)):  # biggest first, to the lightest
        k = sizes.index(min(sizes))
        shares[k] += group
        sizes[k] += sum(_size(p) for p in group)
    with ProcessPoolExecutor(len(shares), mp_context=get_context("spawn")) as pool:
        parts = list(pool.map(replay_part, shares, [settings] * len(shares), [until] * len(shares)))
    runs = [r for p in parts for r in p.runs]
    if len(runs) != len(set(runs)) or len(runs) > settings.limits.max_runs:
        return replay_part(files, settings, until)  # a run in two shares, or the run cap: as one process
    out = Part()
    out.alerts = list(heapq.merge(*(p.alerts for p in parts), key=lambda a: a[0]))
    for p in parts:
        out.stats.records += p.stats.records
        out.stats.skipped += p.stats.skipped
        out.stats.first_errors += p.stats.first_errors[:5 - len(out.stats.first_errors)]
        out.runs |= p.runs
    return out


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0
