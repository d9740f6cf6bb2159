"""``/v1/runs``: the runs this sidecar watches, as status.py shows them."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from ..service import Service
from ..status import run_view, runs_view
from .answers import JSON, error


def router(service: Service) -> APIRouter:
    api = APIRouter()

    @api.get("/v1/runs")
    async def runs() -> Response:
        return JSON(runs_view(service.pipeline))

    @api.get("/v1/runs/{run}")
    async def run(run: str) -> Response:
        state = service.pipeline.runs.get(run)
        if state is None:
            return error(f"run {run!r} is not known to this sidecar", 404)
        return JSON(run_view(state, service.book, detail=True, findings=service.pipeline.findings(run)))

    return api
