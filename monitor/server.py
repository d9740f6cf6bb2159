"""Wiring: settings -> Service with its sinks -> FastAPI app. The one place components are assembled."""

from __future__ import annotations

from typing import Any, Callable

from fastapi import FastAPI

from .api import create_app
from .config import Settings
from .service import Service


def build_service_and_app(settings: Settings, config_file: str | None = None) -> tuple[Service, FastAPI]:
    service = Service(settings, config_file=config_file)
    hooks: list[Callable[[FastAPI], Any]] = []
    return service, create_app(service, hooks)
