"""No web page may change the sidecar's state: cross-site writes get a 403 (docs/operations.md, "Exposure").

Without a token (the default on loopback) a page on any site could otherwise ``POST`` to
``http://127.0.0.1:9464``: a browser sends a "simple" request (``text/plain``, no custom header)
cross-site without asking first, so a silence, a reload or a batch of fake records went through. Every
browser sends ``Origin`` with such a request, and Chromium and Firefox send ``Sec-Fetch-Site`` too; the
project's client, curl and Prometheus send neither. So a request that is not GET/HEAD/OPTIONS is refused when

- ``Sec-Fetch-Site`` is there and is not ``same-origin`` or ``none`` (typed by a person), or
- ``Origin`` is there and is not this sidecar (its host and port are not the ``Host`` header).

The JSON routes (silences, acknowledgements) also want ``Content-Type: application/json`` for a body
(http/alerts.py), a type a browser asks about first (a CORS preflight, which the sidecar never grants).
A pure ASGI middleware: every route, present and future, is covered.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit

from .strict_text import send_error

SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
SAME_SITE = {b"same-origin", b"none"}


def cross_site(headers: list[tuple[bytes, bytes]]) -> str | None:
    """Why a state-changing request with these headers comes from another site's page, or None."""
    found = {name.lower(): value for name, value in headers if name.lower() in (b"origin", b"sec-fetch-site", b"host")}
    fetch_site = found.get(b"sec-fetch-site")
    if fetch_site is not None and fetch_site.strip().lower() not in SAME_SITE:
        return f"Sec-Fetch-Site is {fetch_site.decode('latin-1')!r}"
    origin = found.get(b"origin")
    if origin is None:
        return None
    text = origin.decode("latin-1").strip()
    host = found.get(b"host", b"").decode("latin-1").strip().lower()
    try:
        parts = urlsplit(text)
        netloc = parts.netloc.lower()
        if parts.port is None and netloc:  # the scheme's port, as Host leaves it out
            default = {"http": 80, "https": 443}.get(parts.scheme)
            if host.endswith(f":{default}"):
                host = host.rsplit(":", 1)[0]
    except ValueError:
        netloc = ""
    if not netloc or netloc != host:
        return f"Origin {text[:100]!r} is not this sidecar ({host[:100] or 'no Host header'})"
    return None


class CrossSite:
    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] == "http" and scope["method"] not in SAFE_METHODS:
            why = cross_site(scope.get("headers", []))
            if why is not None:
                await send_error(send, 403, f"{scope['method']} {scope['path']}: refused, a web page on another "
                                            f"site sent it ({why}); send it without Origin (curl, the client)")
                return
        await self.app(scope, receive, send)
