"""Wiring: settings -> Service with its sinks -> FastAPI app. The one place components are assembled."""

from __future__ import annotations

import sqlite3
from typing import Any, Callable

from fastapi import FastAPI

from ..checkpoint import attach_checkpoint
from ..config import ConfigError, Settings
from ..notify.alertmanager import alertmanager_settings
from ..notify.sink import AlertsOut
from ..notify.store import Store
from ..notify.webhooks import webhook_settings
from ..service import Service
from . import alerts as alerts_api
from .app import create_app
from .metrics import metrics_hook


def attach_alerts_out(service: Service) -> AlertsOut:
    """SQLite history and outbox, webhooks, Alertmanager: stored, delivered in the background."""
    settings = service.settings
    webhooks, alertmanager = webhook_settings(settings), alertmanager_settings(settings)
    try:
        store = Store(settings.server.db, clock=service.clock)
    except sqlite3.Error as exc:
        raise ConfigError(f"db: cannot open {settings.server.db!r}: {exc}") from None
    alerts_out = AlertsOut(store, service, webhooks, alertmanager)
    service.record_sinks.append(store.note_records)
    service.sinks.append(alerts_out)
    service.background.append(alerts_out.run)
    service.closers.append(store.close)
    service.query_alerts = store.query_alerts
    return alerts_out


def build_service_and_app(settings: Settings, config_file: str | None = None) -> tuple[Service, FastAPI]:
    service = Service(settings, config_file=config_file)
    alerts_out = attach_alerts_out(service)
    attach_checkpoint(service)  # after the store put its open alerts back: the replay reconciles with them
    hooks: list[Callable[[FastAPI], Any]] = [metrics_hook(service), alerts_api.routes(alerts_out)]
    return service, create_app(service, hooks)
