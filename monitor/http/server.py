"""Wiring: settings -> store, recorder, alerts out -> Service -> FastAPI app. The one place components are
assembled; each is passed to the constructor of what uses it."""

from __future__ import annotations

import sqlite3
import time
from typing import Any, Callable

import uvicorn
from fastapi import FastAPI

from ..checkpoint import attach_checkpoint
from ..config import ConfigError, Settings
from ..notify.console import ConsoleLog
from ..notify.sink import AlertsOut
from ..notify.store import Store
from ..record import Record
from ..recorder import FlightRecorder
from ..reserve import Reserve
from ..service import Service
from . import alerts as alerts_api
from .app import create_app
from .metrics import metrics_hook
from .page import page_hook


def build_service(settings: Settings, *, clock: Callable[[], float] = time.time,
                  load_settings: Callable[[], Settings] | None = None) -> tuple[Service, AlertsOut]:
    """The sidecar without HTTP: SQLite history and outbox, webhooks and Alertmanager, the flight recorder."""
    try:
        store = Store(settings.server.db, clock=clock)
    except sqlite3.Error as exc:
        raise ConfigError(f"server.db: cannot open {settings.server.db!r}: {exc}") from None
    alerts_out = AlertsOut(store, settings.webhooks, settings.alertmanager, clock=clock)

    def note_records(records: list[Record]) -> None:
        try:
            store.note_records(records)
        except (sqlite3.Error, OSError) as exc:  # runs and starts: counted, the batch goes on
            alerts_out.fault.failed("runs and starts", exc)

    record_sinks: list[Any] = [note_records]
    closers = [alerts_out.close, store.close]
    faults = [alerts_out.fault]
    if settings.server.record_dir:  # the flight recorder: the first record sink
        try:
            recorder = FlightRecorder(settings.server.record_dir, settings.server.record_max_bytes)
        except OSError as exc:
            raise ConfigError(f"server.record_dir: cannot create {settings.server.record_dir!r}: "
                              f"{exc.strerror}") from None
        record_sinks.insert(0, recorder.write)
        closers.insert(0, recorder.close)
        faults.append(recorder.fault)
    service = Service(
        settings, clock=clock, sinks=[ConsoleLog(), alerts_out],  # the console: one line per transition and refresh
        record_sinks=record_sinks, background=[alerts_out.run],
        closers=closers, query_alerts=alerts_out.query_alerts, faults=faults,
        restored=alerts_out.restored(), runs_last_seen=store.runs_last_seen() if alerts_out.open else {},
        alert_ids=store.new_id,  # the book assigns ids from the store's sequence (never reused, restarts too)
        load_settings=load_settings,
        reloaders=[lambda new: alerts_out.retarget(new.webhooks, new.alertmanager)])
    return service, alerts_out


def build_service_and_app(settings: Settings,
                          load_settings: Callable[[], Settings] | None = None) -> tuple[Service, FastAPI]:
    service, alerts_out = build_service(settings, load_settings=load_settings)
    attach_checkpoint(service)  # after the store put its open alerts back: the replay reconciles with them
    if settings.server.db != ":memory:":
        reserve = Reserve(settings.server.db)  # room for the last writes of a clean stop on a full disk
        service.closers.insert(0, reserve.release)  # given back before the final snapshot and alert writes
    service.watch.resume(list(service.book.open.values()))  # stops for what is still open after a restart
    hooks: list[Callable[[FastAPI], Any]] = [metrics_hook(service), alerts_api.routes(alerts_out),
                                             page_hook(service)]
    return service, create_app(service, hooks)


class Server(uvicorn.Server):
    """uvicorn's server, whose shutdown first answers the long polls (``GET /v1/runs/{run}/watch``): a
    waiting client must not hold the sidecar up for the whole graceful-shutdown timeout."""

    def __init__(self, config: uvicorn.Config, service: Service) -> None:
        super().__init__(config)
        self.service = service

    async def shutdown(self, sockets: Any = None) -> None:
        self.service.watch.wake_all()
        await super().shutdown(sockets)
