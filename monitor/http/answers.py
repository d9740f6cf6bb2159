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
from .bodies import RETRY_AFTER_SECONDS, Busy, Receiving, TooBig

MAX_BODY = 64 << 10
MAX_ID = 2**63 - 1  # SQLite's INTEGER: a larger id was a 500 (OverflowError), not a 400


class JSON(Response):
    """JSON that keeps NaN as "NaN" (never null); see jsonout."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return jsonout.dumpb(content)


def error(message: str, status: int = 400) -> JSON:
    return JSON({"error": message}, status)


def refused(exc: BadRequest) -> JSON:
    """The answer to a body read_body refused: its status, and Retry-After with a 503."""
    return JSON({"error": str(exc)}, exc.status, headers=exc.headers)


class BadRequest(ValueError):
    """A body that is not a small JSON document."""

    status = 400
    headers: dict[str, str] = {}


class UnsupportedType(BadRequest):
    """A body that is not sent as application/json (415)."""

    status = 415


class TooLarge(BadRequest):
    """A body over ``MAX_BODY`` (413); the rest of it is not read."""

    status = 413


class Unavailable(BadRequest):
    """The bodies being received fill ``limits.max_buffered_bytes`` (503, with Retry-After)."""

    status = 503
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}


async def read_body(request: Request) -> Any:
    """The request's JSON body ({} when empty), or BadRequest naming what is wrong with it. The body is read
    up to ``MAX_BODY`` bytes and no further (413), counted with every other body being received (bodies.py:
    503 when they fill ``limits.max_buffered_bytes``)."""
    receiving = Receiving(getattr(request.app.state, "bodies", None))
    try:
        raw = await receiving.read(request, MAX_BODY)
    except ClientDisconnect:  # gone mid-body: the answer is never read, and no traceback is logged
        raise BadRequest("body: the client disconnected before sending all of it") from None
    except TooBig:
        raise TooLarge(f"body: at most {MAX_BODY} bytes") from None
    except Busy as exc:
        raise Unavailable(f"body: {exc}") from None
    finally:
        receiving.close()  # the body is small and parsed at once: it need not count any longer
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
