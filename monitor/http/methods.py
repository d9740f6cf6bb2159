"""``Allow`` lists every method of a path: ``OPTIONS`` answers 204 with it, and a 405 carries it.

Starlette answers a method a path does not take from the first route with that path alone, so a path
with a GET and a POST route said ``Allow: GET`` (RFC 9110 wants every method the resource takes). The
``OPTIONS`` answer has no CORS header: a browser's preflight from another site still fails (cross_site.py).
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Sequence

from starlette.routing import BaseRoute, Match


class AllowedMethods:
    """``routes``: the app's routes as its routers hold them (FastAPI may keep an included router's routes
    behind one entry of the app's own list); the app's own list is read too (/openapi.json, /docs)."""

    def __init__(self, app: Callable[..., Awaitable[None]], routes: Sequence[BaseRoute] = ()) -> None:
        self.app = app
        self.routes = list(routes)

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        allowed = _allowed(scope, self.routes)
        if not allowed:  # no route has this path: the 404 as it is
            await self.app(scope, receive, send)
            return
        allow = b", ".join(m.encode() for m in sorted(allowed))
        if scope["method"] == "OPTIONS":
            await send({"type": "http.response.start", "status": 204,
                        "headers": [(b"allow", allow), (b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return

        async def send_with_allow(message: Any) -> None:
            if message["type"] == "http.response.start" and message["status"] == 405:
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"allow"]
                message = {**message, "headers": [*headers, (b"allow", allow)]}
            await send(message)

        await self.app(scope, receive, send_with_allow)


def _allowed(scope: dict[str, Any], routes: Sequence[BaseRoute]) -> set[str]:
    """Every method of the routes whose path matches (HEAD with GET, and OPTIONS)."""
    app = scope.get("app")
    methods: set[str] = set()
    for route in [*routes, *getattr(getattr(app, "router", None), "routes", [])]:
        route_methods = getattr(route, "methods", None)
        if route_methods and route.matches(scope)[0] != Match.NONE:  # PARTIAL: the path, not the method
            methods |= set(route_methods)
    return methods | {"OPTIONS"} if methods else methods
