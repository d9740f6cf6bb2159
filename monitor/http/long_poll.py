"""``GET /v1/runs/{run}/watch``: the long poll on which a run's clients hear its alerts and stop steps
(stop_steps.py), as soon as they change."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from ..record import RecordError, check_run
from ..service import Service
from .answers import JSON, MAX_ID, error


def router(service: Service) -> APIRouter:
    api = APIRouter()

    @api.get("/v1/runs/{run}/watch")
    async def watch(request: Request, run: str, version: Annotated[int, Query(ge=-1, le=MAX_ID)] = -1,
                    timeout: Annotated[float, Query(ge=0.0, le=60.0)] = 30.0) -> Response:
        """Long poll: the run's view (firing alerts, stop steps; stop_steps.py) as soon as its version is not
        ``version``, or after ``timeout`` seconds as it is. A run not known yet has version 0. A client
        of another job than the run's owner (X-Trainhealth-Launch) hears nothing: 409."""
        try:
            check_run(run)  # the record's own rule and words (its pattern is in the OpenAPI schema: openapi.py)
        except RecordError as exc:
            return error(str(exc))
        refused = service.other_job(run, request.headers.get("x-trainhealth-launch"))
        if refused:
            return error(refused, 409)
        if service.stop_steps.version(run) == version and timeout > 0:
            changed = asyncio.get_running_loop().create_future()

            def wake() -> None:
                if not changed.done():
                    changed.set_result(None)

            if service.stop_steps.wait(run, wake):
                try:
                    await asyncio.wait_for(changed, timeout)
                except asyncio.TimeoutError:
                    pass
                finally:
                    service.stop_steps.cancel(run, wake)
        return JSON(service.stop_steps.view(run))

    return api
