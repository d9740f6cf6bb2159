"""Pure builders of the status API's answers (the routes in api.py only adapt them)."""

from __future__ import annotations

from typing import Any

from .alerts import AlertBook
from .pipeline import Pipeline
from .record import to_obj
from .state import RankState, RunState


def rank_view(r: RankState, detail: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "rank": r.rank,
        "step": r.last_step if r.last_step >= 0 else None,
        "last_time": r.last_time,
        "last_sample_time": r.last_sample_time,
        "last_heartbeat_time": r.last_heartbeat_time,
        "phase": r.phase,
        "phase_time": r.phase_time,
        "records": r.records,
        "ended": r.ended,
    }
    if detail:
        out["latest"] = dict(r.latest)
        if r.metrics:
            out["metrics"] = dict(r.metrics)
        if r.host is not None:
            out["host"] = r.host
        if r.pid is not None:
            out["pid"] = r.pid
        if r.last_oom is not None:
            out["last_oom"] = r.last_oom
        if r.gpu_health is not None:
            out["gpu_health"] = dict(r.gpu_health)
    return out


def run_view(run: RunState, book: AlertBook, detail: bool = False,
             findings: dict[str, Any] | None = None) -> dict[str, Any]:
    steps = [r.last_step for r in run.ranks.values() if r.last_step >= 0]
    out: dict[str, Any] = {
        "run": run.run,
        "ranks": len(run.ranks),
        "step": max(steps) if steps else None,
        "min_step": min(steps) if steps else None,
        "last_time": run.clock,
        "records": run.records,
        "ended": run.ended,
        "firing": book.firing(run.run),
    }
    if findings:
        out["findings"] = findings  # run-level detector facts, e.g. nan_divergence's first rank
    if detail:
        out["rank_states"] = [rank_view(r, True) for _, r in sorted(run.ranks.items())]
        out["starts"] = [to_obj(s) for s in run.starts]
        ooms = [(r.last_oom["time"], r.rank, r.last_oom) for r in run.ranks.values() if r.last_oom]
        if ooms:
            t, rank, oom = max(ooms, key=lambda o: o[0])
            out["last_oom"] = {"rank": rank, **oom}
    return out


def runs_view(pipeline: Pipeline) -> dict[str, Any]:
    runs = sorted(pipeline.runs.values(), key=lambda r: r.clock, reverse=True)
    return {"runs": [run_view(r, pipeline.book, findings=pipeline.findings(r.run)) for r in runs]}
