"""``/v1/alerts``: the alert history, and what people do with an alert in the store.

- ``GET /v1/alerts?run=&state=&alert=&since=&limit=&cursor=&delivery=``: transitions, newest first (the
  store's history, paged with ``next_cursor``; without a store, the in-memory book);
- ``POST /v1/alerts/redeliver[?target=]``, ``POST /v1/alerts/{id}/redeliver``: send undelivered ones again;
- ``POST /v1/alerts/{id}/ack`` {by?, comment?} -> the alert, ``acknowledged: true``; any transition id of
  the alert works and the whole episode (firing and its resolve) shows as acknowledged.

Parameters are checked by FastAPI from their annotations (the OpenAPI schema says the same); a bad one is a
400 naming it (app.py).
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response

from ..notify.sink import AlertsOut
from ..service import Service
from .answers import JSON, MAX_ID, BadRequest, error, read_body, refused, store_errors

AlertId = Annotated[int, Path(ge=0, le=MAX_ID)]
State = Literal["firing", "resolved"]
Delivery = Literal["pending", "delivered", "undelivered"]


def router(service: Service) -> APIRouter:
    """``GET /v1/alerts``, from the store when the Service has one (``query_alerts``), else from its book."""
    api = APIRouter()

    @api.get("/v1/alerts")
    async def alert_history(run: str | None = None, state: State | None = None, alert: str | None = None,
                            since: float | None = None,
                            limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
                            cursor: Annotated[int | None, Query(ge=0, le=MAX_ID)] = None,
                            delivery: Delivery | None = None) -> Response:
        if service.query_alerts is not None:  # the store: full history, paged with next_cursor
            return JSON(service.query_alerts(run=run, state=state, alert=alert, since=since, limit=limit,
                                             cursor=cursor, **({"delivery": delivery} if delivery else {})))
        if delivery is not None:
            return error("delivery: this sidecar keeps no alert store")
        return JSON({"alerts": service.book.query(run=run, state=state, alert=alert, since=since, limit=limit)})

    return api


def store_router(out: AlertsOut) -> APIRouter:
    """Redelivery and acknowledgement of the alerts in the store."""
    api = APIRouter()

    @api.post("/v1/alerts/redeliver")
    @store_errors
    async def redeliver_all(target: str | None = None) -> Response:
        try:
            return JSON({"redelivered": out.redeliver(target=target)})
        except KeyError:
            names = ", ".join(t.name for t in out.targets) or "none"
            return error(f"target: no configured target named {target!r} (targets: {names})", 404)

    @api.post("/v1/alerts/{alert_id}/redeliver")
    @store_errors
    async def redeliver(alert_id: AlertId) -> Response:
        if out.store.get_alert(alert_id) is None:
            return error(f"alert {alert_id} does not exist", 404)
        return JSON({"redelivered": out.redeliver(alert_id)})

    @api.post("/v1/alerts/{alert_id}/ack")
    @store_errors
    async def acknowledge(request: Request, alert_id: AlertId) -> Response:
        try:
            body = await read_body(request)
        except BadRequest as exc:
            return refused(exc)
        if not isinstance(body, dict):
            return error(f"body: must be a JSON object, got {body!r:.80}")
        by, comment = body.get("by"), body.get("comment")
        for key, value in (("by", by), ("comment", comment)):
            if value is not None and (not isinstance(value, str) or len(value) > 1000):
                return error(f"{key}: must be a string of at most 1000 chars, got {value!r:.80}")
        alert = out.acknowledge(alert_id, by, comment)
        if alert is None:
            return error(f"alert {alert_id} does not exist", 404)
        return JSON(alert)

    return api
