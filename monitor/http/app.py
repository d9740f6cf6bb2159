"""HTTP adapter: the FastAPI app over a Service, one router per resource. Routes only adapt; status.py,
the Service and the store build the answers.

| router | routes |
| --- | --- |
| ingest.py | ``POST /v1/ingest`` |
| runs.py | ``GET /v1/runs``, ``GET /v1/runs/{run}`` |
| alerts.py | ``GET /v1/alerts``; with a store: redeliver, ``POST /v1/alerts/{id}/ack`` |
| long_poll.py | ``GET /v1/runs/{run}/watch``: a run's alerts and stop steps, for its clients |
| silences.py | ``/v1/silences`` (with a store) |
| operations.py | ``POST /-/reload``, ``GET /healthz`` |
| metrics.py | ``GET /metrics`` |
| page.py | ``GET /``, the live page |

This module adds what covers every route: the lifespan (the timer and the Service's background jobs), the
bearer token, the error answers (``{"error": ...}``, a bad parameter a 400 naming it), the guards
(methods.py, strict_text.py, cross_site.py, hosts.py) and the OpenAPI schema (openapi.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from ..metrics.collector import LatencyHistogram
from ..service import Service
from . import alerts, ingest, long_poll, operations, runs
from .answers import JSON
from .bodies import BodyBudget, budget_of
from .cross_site import CrossSite
from .hosts import AllowedHosts, HostNames
from .methods import AllowedMethods
from .metrics import IngestTimer
from .openapi import describe
from .strict_text import StrictText

log = logging.getLogger(__name__)

OPEN_PATHS = {"/healthz"}
PAGE_PATH = "/"  # the only route that also takes the token as ?token= (http/page.py)


def create_app(service: Service, routers: Sequence[APIRouter] = (), *,
               latency: LatencyHistogram | None = None, bodies: BodyBudget | None = None) -> FastAPI:
    """The sidecar's ASGI app: the core routers (ingest, runs, the alert history, the long poll, operations), then
    ``routers`` (/metrics, the store's alert actions, silences, the page: assembly.py). ``latency``: each
    POST /v1/ingest is timed into it (the /metrics router reads it). ``bodies``: the request bodies held at once
    (bodies.py; the /metrics router reads it too); None: a budget of the Service's settings."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(_timer(service))]
        tasks += [asyncio.create_task(job()) for job in service.background]
        loop = asyncio.get_running_loop()
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            loop.add_signal_handler(signal.SIGHUP, service.reload)  # main thread only
        for task in tasks:
            task.add_done_callback(_report_death)  # logged when it dies, not at shutdown
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # a dead job must not skip close()
            service.close()

    app = FastAPI(title="trainhealth", lifespan=lifespan, default_response_class=JSON)
    app.state.service = service
    app.add_exception_handler(HTTPException, _http_error)  # every error answer is {"error": ...}
    app.add_exception_handler(RequestValidationError, _bad_parameter)  # 400, not FastAPI's 422
    if bodies is None:
        bodies = budget_of(service.settings)
    app.state.bodies = bodies  # every body being received, together (bodies.py; answers.read_body)
    apis = [ingest.router(service, bodies), runs.router(service), alerts.router(service), long_poll.router(service),
            operations.router(service), *routers]
    for api in apis:
        app.include_router(api)
    app.state.routes = [route for api in apis for route in api.routes]  # for a 404's list of routes
    # OPTIONS and 405s list every method of a path (methods.py), after the token
    app.add_middleware(AllowedMethods, routes=app.state.routes)
    if service.settings.server.token:
        app.middleware("http")(bearer_token(service.settings.server.token))
    if latency is not None:
        app.add_middleware(IngestTimer, histogram=latency)
    app.add_middleware(StrictText)  # paths and queries that are not UTF-8: a 400 naming them
    app.add_middleware(CrossSite)  # no web page on another site may change anything (cross_site.py)
    server = service.settings.server  # outermost: a name the sidecar is not reached by, 421 (DNS rebinding)
    app.add_middleware(AllowedHosts, names=HostNames(server.allowed_hosts, server.host))
    describe(app)  # /openapi.json as the API is (bodies, error answers)
    return app


def bearer_token(token: str) -> Callable[[Request, Any], Awaitable[Response]]:
    """Middleware: every route but /healthz wants ``Authorization: Bearer TOKEN``; the page also ``?token=``."""
    expected = token.encode()

    async def require_token(request: Request, call_next: Any) -> Response:
        if request.url.path not in OPEN_PATHS:
            scheme, _, got = request.headers.get("authorization", "").partition(" ")
            if request.url.path == PAGE_PATH and not scheme and "token" in request.query_params:
                # the live page: a browser cannot send a header when it navigates (docs/page.md)
                scheme, got = "bearer", request.query_params["token"]
            # the scheme is case-insensitive (RFC 9110): "bearer T" is as good as "Bearer T"
            if scheme.lower() != "bearer" or not hmac.compare_digest(got.strip().encode(), expected):
                error = "missing or wrong Authorization: Bearer token"
                if request.url.path == PAGE_PATH:
                    error += " (in a browser: open /?token=TOKEN)"
                return JSON({"error": error}, 401, headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    return require_token


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = f"{request.method} {request.url.path}: {exc.detail}"
    if exc.status_code == 404:
        paths = [getattr(r, "path", "") for r in request.app.state.routes]
        ours = [p for p in paths if p.startswith(("/v1", "/-", "/metrics", "/health"))]
        message += f" (routes: {', '.join(ours)})"
    return JSON({"error": message}, exc.status_code, headers=exc.headers)


async def _bad_parameter(request: Request, exc: Exception) -> Response:
    """A parameter FastAPI refused (its annotation: a type, a range, a choice): a 400 naming the first."""
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
    if first.get("type") == "literal_error":  # a choice: "state: must be 'firing' or 'resolved', got 'open'"
        expected = first.get("ctx", {}).get("expected", "")
        return JSON({"error": f"{where}: must be {expected}, got {first.get('input')!r}"}, 400)
    return JSON({"error": f"{where}: {first.get('msg', 'invalid')} (value: {first.get('input')!r})"}, 400)


def _report_death(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background job %s stopped: %r", task.get_coro(), task.exception(),
                  exc_info=task.exception())


async def _timer(service: Service) -> None:
    """Time passes without records: liveness checks run on the wall clock."""
    period = service.settings.server.tick_seconds
    while True:
        await asyncio.sleep(period)
        try:
            service.tick()
        except Exception:  # the timer must outlive a detector bug
            log.exception("timer tick failed")
