"""``/v1/silences``: alerts of a run (an alert, a rank) kept from the delivery targets until a time.

- ``POST /v1/silences`` {run, alert?, rank?, until (unix s), comment?, created_by?} -> 201 the silence
- ``GET /v1/silences[?expired=true]``, ``DELETE /v1/silences/{id}`` (expires it now)
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request
from fastapi.responses import Response

from ..notify.silences import SilenceError
from ..notify.sink import AlertsOut
from .answers import JSON, MAX_ID, BadRequest, error, read_body, refused, store_errors


def router(out: AlertsOut) -> APIRouter:
    api = APIRouter()

    @api.post("/v1/silences")
    @store_errors
    async def create_silence(request: Request) -> Response:
        try:
            return JSON(out.add_silence(await read_body(request)), 201)
        except BadRequest as exc:
            return refused(exc)
        except SilenceError as exc:
            return error(str(exc))

    @api.get("/v1/silences")
    async def list_silences(expired: bool = False) -> Response:
        return JSON({"silences": out.list_silences(expired)})

    @api.delete("/v1/silences/{silence_id}")
    @store_errors
    async def expire_silence(silence_id: Annotated[int, Path(ge=0, le=MAX_ID)]) -> Response:
        if not out.expire_silence(silence_id):
            return error(f"silence {silence_id} does not exist", 404)
        return JSON({"expired": silence_id})

    return api
