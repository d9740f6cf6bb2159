"""The app's lifespan: background jobs start with the server, and shutdown always closes the service."""

from __future__ import annotations

import asyncio
import logging

import pytest
from trainhealth.config import Settings
from trainhealth.http.app import create_app
from trainhealth.service import Service


def test_a_background_job_that_died_is_logged_and_shutdown_still_closes_the_store(
        caplog: pytest.LogCaptureFixture) -> None:
    service = Service(Settings())
    closed: list[str] = []

    async def broken() -> None:
        raise RuntimeError("outbox table missing")

    service.background.append(broken)
    service.closers.append(lambda: closed.append("store"))
    app = create_app(service)

    async def serve_briefly() -> None:
        async with app.router.lifespan_context(app):
            await asyncio.sleep(0.01)

    with caplog.at_level(logging.ERROR, logger="trainhealth.http.app"):
        asyncio.run(serve_briefly())
    assert closed == ["store"]
    assert "outbox table missing" in caplog.text and "stopped" in caplog.text


def test_shutdown_cancels_running_jobs_and_closes_once() -> None:
    service = Service(Settings())
    closed: list[str] = []
    cancelled: list[bool] = []

    async def forever() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    service.background.append(forever)
    service.closers.append(lambda: closed.append("store"))
    app = create_app(service)

    async def serve_briefly() -> None:
        async with app.router.lifespan_context(app):
            await asyncio.sleep(0.01)

    asyncio.run(serve_briefly())
    assert (closed, cancelled) == (["store"], [True])
