"""HTTP adapter for the exporter: ``GET /metrics`` and the ingest latency timer.

``router(service, latency, bodies)`` is the route for ``create_app(service, routers, latency=latency,
bodies=bodies)`` (the app times each ingest into ``latency`` with ``IngestTimer`` and counts the request bodies
it holds in ``bodies``); ``state_collector(service)`` hands the collector the parts of a Service it reads (the
pipeline, the clock, the ingest counters, the alert sinks that report delivery stats, ``[exporter]``), so the
collector never sees the Service itself.
The bearer-token middleware of app.py covers /metrics like every other route.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Callable

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest

from ..config import ExporterSettings
from ..health import HealthCollector
from ..metrics.collector import LatencyHistogram, StateCollector, render

if TYPE_CHECKING:
    from ..service import Service
    from .bodies import BodyBudget

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


def _render(snap: Any, health: CollectorRegistry, collector: StateCollector) -> bytes:
    return render(snap, collector.lines, generate_latest(health))


def state_collector(service: Service, settings: ExporterSettings | None = None,
                    latency: LatencyHistogram | None = None, bodies: BodyBudget | None = None) -> StateCollector:
    """The collector over a Service's parts; its sinks list is read live (a sink added later is seen).
    ``settings``: the Service's ``[exporter]`` unless given."""
    return StateCollector(service.pipeline, service.clock, stats=service.stats, latency=latency,
                          bodies=bodies, delivery_sources=service.alert_sinks,
                          settings=settings if settings is not None else service.settings.exporter)


def router(service: Service, latency: LatencyHistogram | None = None,
           bodies: BodyBudget | None = None) -> APIRouter:
    """``GET /metrics`` over a collector built here (rendered by ``render``, never a global registry)."""
    collector = state_collector(service, latency=latency, bodies=bodies)
    # the sidecar's own health (store/recorder/state errors, undelivered notifications): in-memory counters,
    # in a registry of their own, written after the pipeline's families
    health = CollectorRegistry()
    health.register(HealthCollector(service.faults, service.alert_sinks))
    api = APIRouter()

    @api.get("/metrics")
    async def metrics() -> Response:
        snap = collector.snapshot()  # on the event loop: copies only
        body = await asyncio.to_thread(_render, snap, health, collector)  # building + formatting: off the loop
        return Response(body, media_type=CONTENT_TYPE_PLAIN_0_0_4)  # 0.0.4: older Prometheus too

    return api
