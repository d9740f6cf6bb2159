"""HTTP adapter for the exporter: ``GET /metrics`` and the ingest latency timer.

``metrics_hook(service)`` returns a hook for ``create_app(service, hooks)``.
The bearer-token middleware of api.py covers /metrics like every other route.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry

from ..health import HealthCollector
from ..metrics.collector import LatencyHistogram, StateCollector, exporter_settings, render

INGEST_PATH = "/v1/ingest"


class IngestTimer:
    """ASGI middleware: observes the duration of each POST /v1/ingest request (all outcomes)."""

    def __init__(self, app: Any, histogram: LatencyHistogram, clock: Callable[[], float] = time.perf_counter,
                 ) -> None:
        self.app = app
        self.histogram = histogram
        self.clock = clock

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != INGEST_PATH:
            await self.app(scope, receive, send)
            return
        start = self.clock()
        try:
            await self.app(scope, receive, send)
        finally:
            self.histogram.observe(self.clock() - start)


def metrics_hook(service: Any) -> Callable[[FastAPI], None]:
    """Builds the collector in its own registry (never the global one) and the route over it."""
    latency = LatencyHistogram()
    collector = StateCollector(service, exporter_settings(service.settings.raw), latency)
    registry = CollectorRegistry()
    registry.register(collector)
    registry.register(HealthCollector(service.faults, service.sinks))  # store/recorder errors, undelivered

    def hook(app: FastAPI) -> None:
        app.state.metrics_registry = registry
        app.add_middleware(IngestTimer, histogram=latency)

        @app.get("/metrics")
        async def metrics() -> Response:
            snap = collector.snapshot()  # on the event loop: copies only
            body = await asyncio.to_thread(render, registry, snap)  # building + formatting: off the loop
            return Response(body, media_type=CONTENT_TYPE_PLAIN_0_0_4)  # 0.0.4: older Prometheus too

    return hook
