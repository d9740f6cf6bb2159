"""Paths and query strings must be UTF-8 after percent-decoding: a 400 naming the part, never a guess.

Starlette reads an invalid escape (``?run=%FF``) as U+FFFD and answers as if another name had
been asked for (an empty list, a 404 for a run nobody sent). A pure ASGI middleware, so every
route, present and future, is covered.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable
from urllib.parse import unquote_to_bytes

from .. import jsonout

ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


def bad_bytes(raw_path: bytes, query: bytes) -> str | None:
    """The reason the path or a query parameter is not UTF-8, or None."""
    try:
        unquote_to_bytes(raw_path).decode("utf-8")
    except UnicodeDecodeError:
        return f"path: not valid UTF-8 after percent-decoding ({_shown(raw_path)})"
    for part in query.split(b"&"):
        name, _, value = part.partition(b"=")
        for raw in (name, value):
            try:
                unquote_to_bytes(raw.replace(b"+", b" ")).decode("utf-8")
            except UnicodeDecodeError:
                shown = unquote_to_bytes(name).decode("utf-8", "replace")
                return f"query parameter {shown!r}: not valid UTF-8 after percent-decoding ({_shown(raw)})"
    return None


def _shown(raw: bytes) -> str:
    text = repr(raw)
    return text if len(text) <= 80 else text[:77] + "..."


class StrictText:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] == "http":
            raw_path = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
            error = bad_bytes(raw_path, scope.get("query_string", b""))
            if error is not None:
                await send_error(send, 400, error)
                return
        await self.app(scope, receive, send)


async def send_error(send: Callable[[Any], Awaitable[None]], status: int, error: str) -> None:
    """Answer ``{"error": ...}`` with ``status`` from an ASGI middleware, before the app sees the request."""
    body = jsonout.dumpb({"error": error})
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
