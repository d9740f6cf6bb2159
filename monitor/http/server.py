"""The HTTP server: uvicorn's, whose shutdown first answers the long polls. The app it serves is built by
assembly.py."""

from __future__ import annotations

from typing import Any

import uvicorn

from ..service import Service


class Server(uvicorn.Server):
    """uvicorn's server, whose shutdown first answers the long polls (``GET /v1/runs/{run}/watch``): a
    waiting client must not hold the sidecar up for the whole graceful-shutdown timeout."""

    def __init__(self, config: uvicorn.Config, service: Service) -> None:
        super().__init__(config)
        self.service = service

    async def shutdown(self, sockets: Any = None) -> None:
        self.service.stop_steps.wake_all()
        await super().shutdown(sockets)
