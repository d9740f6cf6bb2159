"""The chart data both pages draw: per-rank columns of charted values, and alert episodes.

Shape (one run): ``{"series": [{"rank", "time": [...], "step": [...], "loss": [...], ...}],
"gpu_total": {rank: bytes}, "host_limit": {rank: bytes},
"alerts": [{"alert", "severity", "rank", "root_ranks", "step", "time", "end", "summary"}],
"lr_expected": [[time, lr], ...]}``. A value is a number, ``None`` (not measured: skipped) or the string
"NaN" / "Infinity" / "-Infinity" (the line breaks and a red mark shows it). ``dumps`` writes it as JSON
that is safe inside a ``<script>`` element.
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterable, Mapping

from .. import jsonout
from ..history import columns
from ..state import RunState
from .glyphs import plain

EPISODE_FIELDS = ("alert", "severity", "rank", "root_ranks", "step", "time", "summary")


def spell_nonfinite(col: list[Any]) -> list[Any]:
    """Non-finite floats -> their JSON-safe spellings; numbers and None unchanged (fast when all finite)."""
    try:
        if math.isfinite(sum(col)):
            return col
    except TypeError:  # a None in the column
        pass
    return [x if x is None or math.isfinite(x) else jsonout.clean(x) for x in col]


def rank_series(rank: int, cols: dict[str, list[Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"rank": rank}
    for name, col in cols.items():
        out[name] = [int(x) for x in col] if name == "step" else spell_nonfinite(col)
    return out


def episodes(transitions: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Alert transitions (any order) -> one episode per firing: when it fired and when it resolved (or None)."""
    open_: dict[str, dict[str, Any]] = {}
    out: list[dict[str, Any]] = []
    ep: dict[str, Any] | None
    for a in sorted(transitions, key=lambda a: (a["time"], a["state"] != "firing")):
        key = a.get("fingerprint") or f"{a['run']}/{a['rank']}/{a['alert']}"
        if a["state"] == "firing":
            if key in open_:
                continue  # the same open alert listed twice (history and the open set)
            ep = {k: a.get(k) for k in EPISODE_FIELDS}
            ep["end"] = None
            open_[key] = ep
            out.append(ep)
        else:
            ep = open_.pop(key, None)
            if ep is None:  # its firing is not in the list: a band from when it started, placed by its first
                ep = {k: a.get(k) for k in EPISODE_FIELDS}  # step, else by that time (not the resolution's step)
                ep["time"] = a.get("started_at", a["time"])
                ep["step"] = a.get("first_step")
                out.append(ep)
            ep["end"] = a["time"]
    for ep in out:  # the charts' list shows summaries as text: the page's font has no pictographs
        if isinstance(ep.get("summary"), str):
            ep["summary"] = plain(ep["summary"])
    cleaned: list[dict[str, Any]] = jsonout.clean(out)
    return cleaned


MAX_CHARTED_RANKS = 64  # a 4,096-rank run charts 64: its alerting ranks first, then the lowest


def live_rows(run: RunState, prefer: Iterable[int | None] = ()) -> tuple[dict[int, Any], dict[str, float]]:
    """Copies of each charted rank's history ring (state.py) and GPU capacity: taken on the event loop
    (a memcpy per rank). At most MAX_CHARTED_RANKS ranks, those in ``prefer`` (alerting) first."""
    with_history = [r for r in sorted(run.ranks) if len(run.ranks[r].history)]
    first = [r for r in dict.fromkeys(prefer) if r is not None and r in run.ranks and len(run.ranks[r].history)]
    chosen = sorted(list(dict.fromkeys(first + with_history))[:MAX_CHARTED_RANKS])
    rows, gpu_total = {}, {}
    for rank in chosen:
        r = run.ranks[rank]
        rows[rank] = r.history.copy()
        total = r.latest.get("gpu_mem_total_bytes")
        if total is not None and math.isfinite(total):
            gpu_total[str(rank)] = total
    return rows, gpu_total


def host_limits(run: RunState, ranks: Iterable[int]) -> dict[str, float]:
    """Each charted rank's latest host memory limit (``host_mem_limit_bytes``), where it has one."""
    out = {}
    for rank in ranks:
        limit = run.ranks[rank].latest.get("host_mem_limit_bytes")
        if limit is not None and math.isfinite(limit):
            out[str(rank)] = limit
    return out


def live_chart(name: str, rows: dict[int, Any], gpu_total: dict[str, float],
               transitions: Iterable[Mapping[str, Any]], ranks_total: int,
               starts: list[dict[str, Any]], host_limit: dict[str, float] | None = None) -> dict[str, Any]:
    """The recent window of one live run, from ``live_rows``' copies (off the event loop)."""
    series = [rank_series(rank, columns(r)) for rank, r in rows.items()]
    until = max((s["time"][-1] for s in series if s["time"]), default=0.0)
    return {"run": name, "series": series, "gpu_total": gpu_total, "host_limit": host_limit or {},
            "alerts": episodes(transitions),
            "ranks_total": ranks_total, "lr_expected": jsonout.clean(lr_expected(starts, until))}


def lr_expected(starts: list[dict[str, Any]], until: float) -> list[list[float]]:
    """The linear scaling rule's LR after each start (as lr_scaling.py computes it): reference_lr x total
    batch / reference_batch_size, the reference being the latest start that carried one, else the run's
    first start (its own LR for its own total batch). Notes ``expected_lr`` and ``total_batch`` on each
    usable start; returns the dashed line the LR chart draws: [[time, lr], ...], a step at each start."""
    out: list[list[float]] = []
    explicit: tuple[float, int] | None = None
    first: tuple[float, int] | None = None
    for s in starts:
        if s.get("reference_lr") is not None and s.get("reference_batch_size"):
            explicit = (s["reference_lr"], s["reference_batch_size"])
        total = (s.get("batch_size") or 0) * (s.get("world_size") or 0)
        lr = s.get("lr")
        if total <= 0 or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            continue
        first = first or (lr, total)
        ref_lr, ref_batch = explicit or first
        expected = ref_lr * total / ref_batch
        if not math.isfinite(expected):
            continue
        s["expected_lr"], s["total_batch"] = expected, total
        if out and out[-1][1] == expected:
            continue  # every rank's start of one launch: the same value, no step
        if out:
            out.append([s["time"], out[-1][1]])
        out.append([s["time"], expected])
    if out:
        out.append([max(until, out[-1][0]), out[-1][1]])
    return out


def dumps(obj: Any) -> str:
    """JSON for a ``<script type="application/json">`` element: no NaN tokens, no ``</script>`` inside."""
    return json.dumps(obj, allow_nan=False, separators=(",", ":")).replace("<", "\\u003c")
