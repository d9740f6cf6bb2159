"""The live page's model: the status API's views plus the chosen run's recent window (pure).

Two halves, so the page costs ingest nothing it can feel: ``snapshot`` copies what it needs on the event
loop (dict views and a memcpy of each rank's history ring), ``finish`` turns the copies into chart data
off the loop (a thread), where the columns are built and the JSON is written.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from ..alerts import AlertBook
from ..pipeline import Pipeline
from ..status import run_view, runs_view
from . import story
from .chart import host_limits, live_chart, live_rows

RECENT_LIMIT = 200  # transitions read for the tables and the chart markers


def snapshot(pipeline: Pipeline, book: AlertBook, recent: Callable[[str, int], list[Mapping[str, Any]]],
             chosen: str | None) -> dict[str, Any]:
    """``recent(run, limit)``: the run's alert transitions, newest first (the store's, else the book's).
    ``chosen``: the run to detail and chart; unknown or None -> the run with the newest record."""
    runs = runs_view(pipeline)["runs"]
    missing = chosen if chosen is not None and chosen not in pipeline.runs else None
    if chosen not in pipeline.runs:
        chosen = runs[0]["run"] if runs else None
    model: dict[str, Any] = {"runs": runs, "chosen": chosen, "detail": None, "recent": [], "chart": None,
                             "missing": missing}
    if chosen is not None:
        state = pipeline.runs[chosen]
        model["detail"] = run_view(state, book, detail=True, findings=pipeline.findings(chosen))
        model["recent"] = recent(chosen, RECENT_LIMIT)
        model["rows"], model["gpu_total"] = live_rows(state, alerting_ranks(model["detail"]["firing"]))
        model["host_limit"] = host_limits(state, model["rows"])
    return model


def finish(model: dict[str, Any]) -> dict[str, Any]:
    """Chart data from the snapshot's copies: the window's samples and the alerts that touch it."""
    rows = model.pop("rows", None)
    gpu_total = model.pop("gpu_total", {})
    host_limit = model.pop("host_limit", {})
    detail = model["detail"]
    if detail is not None:  # the incident card: the run's alert history and what is firing now
        seen = {a.get("fingerprint") for a in model["recent"]}
        told = [*model["recent"], *(a for a in detail["firing"] if a.get("fingerprint") not in seen)]
        fired = [a for a in told if a["state"] == "firing"]
        outcome = story.live_outcome_html(detail["rank_states"], detail["starts"], fired)
        model["incident"] = story.incident_html(told, {}, [], detail["starts"], outcome, "so far")
    if rows is None or detail is None:
        return model
    start = min((r[0] for r in rows.values()), default=None)  # time is each row's first column
    # An alert that fired before the window and resolved later (lr_scaling fires on the start records, before
    # the first sample) keeps its firing transition: it is marked where it fired, with what it said.
    resolved = {a.get("fingerprint") for a in model["recent"] if a["state"] == "resolved"}
    touching = [a for a in model["recent"]
                if start is None or a["time"] >= start or a["state"] == "resolved" or a.get("fingerprint") in resolved]
    model["chart"] = live_chart(model["chosen"], rows, gpu_total, touching + model["detail"]["firing"],
                                model["detail"]["ranks"], [dict(s) for s in model["detail"]["starts"]], host_limit)
    return model


def alerting_ranks(firing: list[dict[str, Any]]) -> list[int | None]:
    """The ranks the firing alerts are about: a per-rank alert's rank, and a run-level incident's root ranks
    (rank_stalled, nan_divergence and rank_failed name them in ``root_ranks``), roots first."""
    roots = [r for a in firing if a.get("rank") is None for r in (a.get("root_ranks") or ())]
    return [*roots, *(a.get("rank") for a in firing)]

