"""Assembly: settings -> the sidecar's parts -> Service -> HTTP app. The one place components are built.

Each part is passed to the constructor of what uses it; nothing is attached to the Service after it is
built. What a start does, in order (each step needs the one before):

1. the store (``--db``): the alert history and the outbox; the alerts open when the sidecar last stopped;
2. the delivery (webhooks, Alertmanager), the flight recorder (``--record``);
3. the pipeline, its book holding the store's open alerts, then the detectors' state restored from the
   checkpoint in ``--db`` (snapshot and journal, checkpoint.py), the verdicts held while the clients retry
   what the stop refused;
4. the Service, given all of them; it sends what the stop left unsent, and its stop-step watch is told
   what is still open (stop_steps.py);
5. the HTTP app over it: one router per resource (http/).
"""

from __future__ import annotations

import sqlite3
import time
from typing import Callable, Sequence

from fastapi import FastAPI

from .alerts import Alert, AlertBook
from .checkpoint import Checkpoint
from .config import ConfigError, ServerSettings, Settings
from .http import alerts, metrics, page, silences
from .http.app import create_app
from .http.bodies import budget_of
from .metrics.collector import LatencyHistogram
from .notify.console import ConsoleLog
from .notify.sink import AlertsOut
from .notify.store import Store
from .pipeline import Pipeline
from .record import Record
from .recorder import FlightRecorder
from .reserve import Reserve
from .service import RecordWriter, Service, pause_watch
from .sidecar_clock import MAX_GRACE_SECONDS, SidecarClock


def build_sidecar(settings: Settings,
                  load_settings: Callable[[], Settings] | None = None) -> tuple[Service, FastAPI]:
    """What ``trainhealth serve`` runs: the Service and the app over it."""
    service, alerts_out = build_service(settings, load_settings=load_settings, keep_state=True)
    return service, build_app(service, alerts_out)


def build_service(settings: Settings, *, clock: Callable[[], float] = time.time,
                  load_settings: Callable[[], Settings] | None = None,
                  keep_state: bool = False) -> tuple[Service, AlertsOut]:
    """The sidecar without HTTP: SQLite history and outbox, webhooks and Alertmanager, the flight recorder;
    with ``keep_state`` (``serve``), the detectors' state kept in ``--db`` across restarts (checkpoint.py)
    and the disk reserve for a clean stop. Without it a restart starts the detectors afresh from the store's
    open alerts (tests and benchmarks of the rest)."""
    store = open_store(settings.server, clock)
    alerts_out = AlertsOut(store, settings.webhooks, settings.alertmanager, clock=clock)

    def note_records(records: Sequence[Record], texts: Sequence[bytes] | None) -> None:
        try:
            store.note_records(records)
        except (sqlite3.Error, OSError) as exc:  # runs and starts: counted, the batch goes on
            alerts_out.fault.failed("runs and starts", exc)

    record_writers: list[RecordWriter] = [note_records]
    closers = [alerts_out.close, store.close]
    faults = [alerts_out.fault]
    background = [alerts_out.run]
    recorder = open_recorder(settings.server)
    if recorder is not None:  # the flight recorder: the first record writer
        record_writers.insert(0, recorder.write)
        closers.insert(0, recorder.close)
        faults.append(recorder.fault)

    pauses = pause_watch(clock)
    # the book assigns transition ids from the store's sequence (never reused, restarts too)
    pipeline = Pipeline(settings.detectors, settings.limits, settings.server.tick_seconds,
                        book=AlertBook(ids=store.new_id))
    restored = alerts_out.restored()
    if restored:
        pipeline.restore(restored, store.runs_last_seen(), clock())
    checkpoint: Checkpoint | None = None
    unsent: list[Alert] = []
    if keep_state:
        checkpoint = open_checkpoint(settings.server)
        unsent = resume(checkpoint, pipeline, pauses)  # after the store's open alerts: it reconciles with them
        faults.append(checkpoint.fault)
        background.append(checkpoint.runner(pipeline, pauses.now))
        closers.insert(0, final_snapshot(checkpoint, pipeline, pauses))
        if settings.server.db != ":memory:":
            reserve = Reserve(settings.server.db)  # room for the last writes of a clean stop on a full disk
            closers.insert(0, reserve.release)  # given back before the final snapshot and alert writes

    service = Service(
        # the console: one line per transition and refresh
        settings, clock=clock, alert_sinks=[ConsoleLog(), alerts_out],
        record_writers=record_writers, background=background, closers=closers,
        keep_texts=recorder is not None,  # the flight recorder writes each record's text as the body held it
        query_alerts=alerts_out.query_alerts, faults=faults, load_settings=load_settings,
        reloaders=[lambda new: alerts_out.retarget(new.webhooks, new.alertmanager)],
        pipeline=pipeline, pauses=pauses, journal=checkpoint)
    service.dispatch(unsent)  # what the stop left unsent: to the store and the targets, once
    service.stop_steps.resume(list(service.book.open.values()))  # stops for what is still open after a restart
    return service, alerts_out


def build_app(service: Service, alerts_out: AlertsOut) -> FastAPI:
    """The HTTP app: the core routes (create_app), /metrics, the store's alert actions, silences, the page."""
    latency = LatencyHistogram()  # POST /v1/ingest durations, timed by the app, read by /metrics
    bodies = budget_of(service.settings)  # the request bodies held at once: counted by the app, read by /metrics
    routers = [metrics.router(service, latency, bodies), alerts.store_router(alerts_out),
               silences.router(alerts_out), page.router(service)]
    return create_app(service, routers, latency=latency, bodies=bodies)


def open_store(server: ServerSettings, clock: Callable[[], float]) -> Store:
    try:
        return Store(server.db, clock=clock)
    except sqlite3.Error as exc:
        raise ConfigError(f"server.db: cannot open {server.db!r}: {exc}") from None


def open_recorder(server: ServerSettings) -> FlightRecorder | None:
    if not server.record_dir:
        return None
    try:
        return FlightRecorder(server.record_dir, server.record_max_bytes)
    except OSError as exc:
        raise ConfigError(f"server.record_dir: cannot create {server.record_dir!r}: {exc.strerror}") from None


def open_checkpoint(server: ServerSettings) -> Checkpoint:
    try:
        return Checkpoint(server.db, server.state_snapshot_seconds)
    except sqlite3.Error as exc:
        raise ConfigError(f"db: cannot keep the detectors' state in {server.db!r}: {exc}") from None


def resume(checkpoint: Checkpoint, pipeline: Pipeline, pauses: SidecarClock) -> list[Alert]:
    """Restore the pipeline from the checkpoint; returns the transitions the stop left unsent."""
    unsent = checkpoint.restore(pipeline, pauses.now())
    if pipeline.runs:  # the clients retry what the stop refused: read it before any verdict
        pauses.hold(MAX_GRACE_SECONDS)
        pipeline.judge_after = pauses.hold_until
    return unsent


def final_snapshot(checkpoint: Checkpoint, pipeline: Pipeline, pauses: SidecarClock) -> Callable[[], None]:
    def close() -> None:
        checkpoint.snapshot(pipeline, pauses.now())  # a clean stop replays nothing
        checkpoint.close()

    return close
