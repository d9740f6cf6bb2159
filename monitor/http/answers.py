"""What every route answers with: JSON that keeps NaN, ``{"error": ...}`` for bad input, and the small JSON
bodies the alert and silence routes read (at most ``MAX_BODY`` bytes, ``application/json`` only)."""

from __future__ import annotations

import functools
import sqlite3
from typing import Any, Awaitable, Callable

from fastapi import Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from .. import jsonout
from ..record import bad_text, loads

MAX_BODY = 64 << 10
MAX_ID = 2**63 - 1  # SQLite's INTEGER: a larger id was a 500 (OverflowError), not a 400


class JSON(Response):
    """JSON that keeps NaN as "NaN" (never null); see jsonout."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return jsonout.dumpb(content)


def error(message: str, status: int = 400) -> JSON:
    return JSON({"error": message}, status)


class BadRequest(ValueError):
    """A body that is not a small JSON document."""

    status = 400


class UnsupportedType(BadRequest):
    """A body that is not sent as application/json (415)."""

    status = 415


async def read_body(request: Request) -> Any:
    """The request's JSON body ({} when empty), or BadRequest naming what is wrong with it."""
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


def store_errors(route: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
    """A write the store refuses (a full disk) is a 503 naming why, never a 500."""
    @functools.wraps(route)
    async def wrapped(*args: Any, **kwargs: Any) -> Response:
        try:
            return await route(*args, **kwargs)
        except (sqlite3.Error, OSError) as exc:
            return error(f"the alert store cannot write now: {exc}", 503)
    return wrapped
