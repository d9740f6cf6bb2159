"""``GET /``: the live page (page/ builds it; this only adapts).

``GET /?run=NAME`` picks the run to chart; ``&part=live`` answers only the fragment the page's script
swaps in on each refresh. With ``--token`` the route wants the token like every other (app.py also takes
``?token=`` here, and only here: a browser cannot send a header when it navigates; see docs/page.md).
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal, Mapping

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

from ..page import html
from ..page.live import finish, snapshot
from ..service import Service

HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
           # everything the page needs is inline; nothing may be loaded from elsewhere
           "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                                      "style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; "
                                      "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"}


def router(service: Service) -> APIRouter:
    def recent(run: str, limit: int) -> list[Mapping[str, Any]]:
        if service.query_alerts is not None:
            return list(service.query_alerts(run=run, limit=limit)["alerts"])
        return list(service.book.query(run=run, limit=limit))

    api = APIRouter()

    @api.get("/", response_class=HTMLResponse)
    async def live_page(run: str | None = None, part: Literal["live"] | None = None) -> Response:
        """``part=live``: only the refreshing fragment."""
        model = snapshot(service.pipeline, service.book, recent, run)  # on the loop: copies only
        render = html.live_fragment if part == "live" else html.page
        body = await asyncio.to_thread(lambda: render(finish(model)))  # columns, JSON, HTML: off the loop
        return HTMLResponse(body, headers=HEADERS)

    return api
