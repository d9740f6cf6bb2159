"""HTTP adapter: FastAPI routes over a Service. Routes only adapt; status.py builds answers."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from .. import jsonout
from ..ingest import Decoded
from ..record import RecordError, check_run
from ..service import Service
from ..status import run_view, runs_view
from .cross_site import CrossSite
from .methods import AllowedMethods
from .openapi import describe
from .strict_text import StrictText

log = logging.getLogger(__name__)

OPEN_PATHS = {"/healthz"}
INLINE_DECODE_BYTES = 1 << 20  # larger bodies (and every gzip body) are decoded off the event loop
PAGE_PATH = "/"  # the only route that also takes the token as ?token= (http/page.py)


class JSON(Response):
    """JSON that keeps NaN as "NaN" (never null); see jsonout."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return jsonout.dumpb(content)


def create_app(service: Service, extra: list[Callable[[FastAPI], None]] | None = None) -> FastAPI:
    """The sidecar's ASGI app. ``extra`` hooks add routes (e.g. /metrics) without touching this file."""

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
    app.add_exception_handler(RequestValidationError, _bad_query)
    token = service.settings.server.token
    app.add_middleware(AllowedMethods)  # OPTIONS and 405s list every method of a path (methods.py), after the token

    if token:
        expected = token.encode()

        @app.middleware("http")
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
                    return JSON({"error": error}, 401,
                                headers={"WWW-Authenticate": "Bearer"})
            return await call_next(request)

    decoding = asyncio.Lock()

    @app.post("/v1/ingest")
    async def ingest(request: Request) -> Response:
        limit = service.settings.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            answer = service.refuse(413, f"body of {declared} bytes is over the limit of {limit} bytes "
                                         "(limits.max_body_bytes): send smaller batches")
            return JSON(answer.body, answer.status)
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    answer = service.refuse(413, f"body is over the limit of {limit} bytes "
                                                 "(limits.max_body_bytes): send smaller batches")
                    return JSON(answer.body, answer.status)
                chunks.append(chunk)
        except ClientDisconnect:  # the client went away mid-body (or the body timeout closed it): no answer
            return Response(status_code=400)
        headers = request.headers
        batch_id = headers.get("x-trainhealth-batch")
        early = service.screen(batch_id)
        if early is not None:
            return JSON(early.body, early.status)
        body, encoding = b"".join(chunks), headers.get("content-encoding")
        async with decoding:  # one body decoded at a time: memory is one body's bound (docs/operations.md)
            if len(body) > INLINE_DECODE_BYTES or (encoding or "").strip().lower() == "gzip":
                decoded = await asyncio.to_thread(service.decode, body, headers.get("content-type"), encoding)
            else:
                decoded = service.decode(body, headers.get("content-type"), encoding)
        if not isinstance(decoded, Decoded):
            return JSON(decoded.body, decoded.status)
        answer = service.take(decoded, batch_id, headers.get("x-trainhealth-views") == "1")
        return JSON(answer.body, answer.status)

    @app.get("/v1/runs")
    async def runs() -> Response:
        return JSON(runs_view(service.pipeline))

    @app.get("/v1/runs/{run}")
    async def run(run: str) -> Response:
        state = service.pipeline.runs.get(run)
        if state is None:
            return JSON({"error": f"run {run!r} is not known to this sidecar"}, 404)
        return JSON(run_view(state, service.book, detail=True, findings=service.pipeline.findings(run)))

    @app.get("/v1/alerts")
    async def alerts(run: str | None = None, state: str | None = None, alert: str | None = None,
                     since: float | None = None, limit: int = 1000,
                     cursor: int | None = Query(None, ge=0, le=2**63 - 1),
                     delivery: str | None = None) -> Response:
        if state not in (None, "firing", "resolved"):
            return JSON({"error": f"state: must be 'firing' or 'resolved', got {state!r}"}, 400)
        if delivery not in (None, "pending", "delivered", "undelivered"):
            return JSON({"error": f"delivery: must be 'pending', 'delivered' or 'undelivered', got {delivery!r}"},
                        400)
        if delivery is not None and service.query_alerts is None:
            return JSON({"error": "delivery: this sidecar keeps no alert store"}, 400)
        if not 1 <= limit <= 10_000:
            return JSON({"error": f"limit: must be 1-10000, got {limit}"}, 400)
        if service.query_alerts is not None:  # the store: full history, paged with next_cursor
            return JSON(service.query_alerts(run=run, state=state, alert=alert, since=since, limit=limit,
                                             cursor=cursor, **({"delivery": delivery} if delivery else {})))
        return JSON({"alerts": service.book.query(run=run, state=state, alert=alert, since=since,
                                                  limit=limit)})

    @app.get("/v1/runs/{run}/watch")
    async def watch(run: str, version: int = Query(-1, ge=-1, le=2**63 - 1),
                    timeout: float = Query(30.0, ge=0.0, le=60.0)) -> Response:
        """Long poll: the run's view (firing alerts, stop steps; watch.py) as soon as its version is not
        ``version``, or after ``timeout`` seconds as it is. A run not known yet has version 0."""
        try:
            check_run(run)
        except RecordError as exc:
            return JSON({"error": str(exc)}, 400)
        if service.watch.version(run) == version and timeout > 0:
            changed = asyncio.get_running_loop().create_future()

            def wake() -> None:
                if not changed.done():
                    changed.set_result(None)

            if service.watch.wait(run, wake):
                try:
                    await asyncio.wait_for(changed, timeout)
                except asyncio.TimeoutError:
                    pass
                finally:
                    service.watch.cancel(run, wake)
        return JSON(service.watch.view(run))

    @app.post("/-/reload")
    async def reload() -> Response:
        result = service.reload()
        return JSON(result, 200 if result["reloaded"] else 400)

    @app.get("/healthz")
    async def healthz() -> Response:
        status, body = service.health()  # 503 while the store or the flight recorder cannot write
        return JSON(body, status)

    for hook in extra or []:
        hook(app)
    app.add_middleware(StrictText)  # paths and queries that are not UTF-8: a 400 naming them
    app.add_middleware(CrossSite)  # no web page on another site may change anything (cross_site.py)
    describe(app)  # /openapi.json as the API is (bodies, error answers)
    return app


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = f"{request.method} {request.url.path}: {exc.detail}"
    if exc.status_code == 404:
        paths = [getattr(r, "path", "") for r in request.app.routes]
        ours = [p for p in paths if p.startswith(("/v1", "/-", "/metrics", "/health"))]
        message += f" (routes: {', '.join(ours)})"
    return JSON({"error": message}, exc.status_code, headers=exc.headers)


async def _bad_query(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
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
