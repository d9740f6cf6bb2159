"""The sidecar's own routes: ``POST /-/reload`` (re-read the config, as SIGHUP does) and ``GET /healthz``
(503 while the store, the recorder or the state cannot write; open without a token)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from ..service import Service
from .answers import JSON


def router(service: Service) -> APIRouter:
    api = APIRouter()

    @api.post("/-/reload")
    async def reload() -> Response:
        result = service.reload()
        return JSON(result, 200 if result["reloaded"] else 400)

    @api.get("/healthz")
    async def healthz() -> Response:
        status, body = service.health()  # 503 while the store or the flight recorder cannot write
        return JSON(body, status)

    return api
