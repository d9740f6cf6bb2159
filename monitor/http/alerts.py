"""Routes for people handling alerts: silences and acknowledgements (added to the app as a hook).

- ``POST /v1/silences`` {run, alert?, rank?, until (unix s), comment?, created_by?} -> 201 the silence
- ``GET /v1/silences[?expired=true]``, ``DELETE /v1/silences/{id}`` (expires it now)
- ``POST /v1/alerts/{id}/ack`` {by?, comment?} -> the alert, ``acknowledged: true``; any transition id of
  the alert works and the whole episode (firing and its resolve) shows as acknowledged.
"""

from __future__ import annotations

import functools
import sqlite3
from typing import Any, Awaitable, Callable

from fastapi import FastAPI, Path, Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from ..notify.silences import SilenceError
from ..notify.sink import AlertsOut
from ..record import bad_text, loads
from .app import JSON

MAX_BODY = 64 << 10


def _id() -> Any:
    return Path(ge=0, le=2**63 - 1)  # SQLite's INTEGER: a larger id was a 500 (OverflowError), not a 400


class BadRequest(ValueError):
    """A body that is not a small JSON document."""


class UnsupportedType(BadRequest):
    """A body that is not sent as application/json (415)."""


async def _body(request: Request) -> Any:
    try:
        raw = await request.body()
    except ClientDisconnect:  # gone mid-body: the answer is never read, and no traceback is logged
        raise BadRequest("body: the client disconnected before sending all of it") from None
    if len(raw) > MAX_BODY:
        raise BadRequest(f"body: at most {MAX_BODY} bytes, got {len(raw)}")
    if not raw.strip():
        return {}
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":  # text/plain and forms are what a web page can send without asking
        raise UnsupportedType(f"Content-Type: must be application/json for a body, got {kind or 'none'!r}")
    try:
        body = loads(raw)  # json.loads, without refusing an integer of 4300+ digits
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"body: not valid JSON ({exc})") from None
    found = bad_text(body, "body")
    if found:
        raise BadRequest(f"{found[0]}: {found[1]}")
    return body


def _store_errors(route: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
    """A write the store refuses (a full disk) is a 503 naming why, never a 500."""
    @functools.wraps(route)
    async def wrapped(*args: Any, **kwargs: Any) -> Response:
        try:
            return await route(*args, **kwargs)
        except (sqlite3.Error, OSError) as exc:
            return JSON({"error": f"the alert store cannot write now: {exc}"}, 503)
    return wrapped


def routes(out: AlertsOut) -> Callable[[FastAPI], None]:
    def add(app: FastAPI) -> None:
        @app.post("/v1/alerts/redeliver")
        @_store_errors
        async def redeliver_all(target: str | None = None) -> Response:
            try:
                return JSON({"redelivered": out.redeliver(target=target)})
            except KeyError:
                names = ", ".join(t.name for t in out.targets) or "none"
                return JSON({"error": f"target: no configured target named {target!r} (targets: {names})"}, 404)

        @app.post("/v1/alerts/{alert_id}/redeliver")
        @_store_errors
        async def redeliver(alert_id: int = _id()) -> Response:
            if out.store.get_alert(alert_id) is None:
                return JSON({"error": f"alert {alert_id} does not exist"}, 404)
            return JSON({"redelivered": out.redeliver(alert_id)})

        @app.post("/v1/silences")
        @_store_errors
        async def create_silence(request: Request) -> Response:
            try:
                return JSON(out.add_silence(await _body(request)), 201)
            except (BadRequest, SilenceError) as exc:
                return JSON({"error": str(exc)}, 415 if isinstance(exc, UnsupportedType) else 400)

        @app.get("/v1/silences")
        async def list_silences(expired: bool = False) -> Response:
            return JSON({"silences": out.list_silences(expired)})

        @app.delete("/v1/silences/{silence_id}")
        @_store_errors
        async def expire_silence(silence_id: int = _id()) -> Response:
            if not out.expire_silence(silence_id):
                return JSON({"error": f"silence {silence_id} does not exist"}, 404)
            return JSON({"expired": silence_id})

        @app.post("/v1/alerts/{alert_id}/ack")
        @_store_errors
        async def acknowledge(request: Request, alert_id: int = _id()) -> Response:
            try:
                body = await _body(request)
            except BadRequest as exc:
                return JSON({"error": str(exc)}, 415 if isinstance(exc, UnsupportedType) else 400)
            if not isinstance(body, dict):
                return JSON({"error": f"body: must be a JSON object, got {body!r:.80}"}, 400)
            by, comment = body.get("by"), body.get("comment")
            for key, value in (("by", by), ("comment", comment)):
                if value is not None and (not isinstance(value, str) or len(value) > 1000):
                    error = f"{key}: must be a string of at most 1000 chars, got {value!r:.80}"
                    return JSON({"error": error}, 400)
            alert = out.acknowledge(alert_id, by, comment)
            if alert is None:
                return JSON({"error": f"alert {alert_id} does not exist"}, 404)
            return JSON(alert)

    return add
