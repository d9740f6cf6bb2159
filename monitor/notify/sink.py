"""Alerts out: the alert sink that stores every transition and notifies what no silence covers.

Per ingest call (or timer tick) with transitions, one SQLite transaction holds
the transitions, the episodes they close and the outbox rows of every target
that wants them; delivery.py then posts from the outbox in the background.

Honest about the disk: a write the store refuses (a full disk) stays here, in
order, and is retried each tick and before every later write until it is in;
``/healthz`` says 503 meanwhile and ``trainhealth_store_errors_total`` counts.
Nothing raised is reported and then lost while the process lives, and ids
handed out meanwhile are reserved in the file (store.py), so never reused.

Restart: the alerts open when the sidecar stopped are loaded here (with their
silenced flag) and handed to the pipeline, whose alert book takes them back
and resolves them as their runs go on or expire (pipeline.py).

Ids: the AlertBook assigns every transition its id, from this store's sequence
(``Store.new_id``, given to the book by assembly.py); this sink only reads
them. What it receives are its own copies (Service.dispatch): ``open`` below is
its own record of the open episodes (id, silenced, latest body), kept in step
by the transitions and refreshes it is handed, never the book's dicts.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from .. import jsonout
from ..alerts import Alert, copied
from ..config import AlertmanagerSettings, WebhookSettings
from ..health import Fault
from .alertmanager import target as alertmanager_target
from .delivery import Deliverer, Target, outbox_rows
from .silences import Silence, parse
from .store import Store, Transition
from .webhooks import target as webhook_target

log = logging.getLogger(__name__)

TICK_SECONDS = 1.0
MAX_UNWRITTEN = 100_000  # transitions held while the store refuses writes (then the oldest go, logged)


@dataclass(slots=True)
class Open:
    alert: Alert  # this sink's copy of the open alert (the latest body it was handed)
    silenced: bool  # not notified yet: a silence matched when it fired


@dataclass(slots=True)
class Write:
    """One batch of transitions for the store, held until it is written."""

    transitions: list[Transition]
    closed: list[int]
    rows: list[tuple[str, str, str]]


class AlertsOut:
    def __init__(self, store: Store, webhooks: list[WebhookSettings],
                 alertmanager: AlertmanagerSettings | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        self.fault = Fault("store")
        self.targets = self._targets(webhooks, alertmanager)
        # built with its targets: rows pending for them at start are theirs, not "no longer configured"
        self.deliverer = Deliverer(store, self.targets, clock=self.clock, fault=self.fault)
        self.silences = [Silence(**s) for s in store.silences(active_at=self.clock())]
        self.open: dict[str, Open] = {}
        for alert, silenced in store.open_alerts():
            self.open[alert["fingerprint"]] = Open(alert, silenced)
        self.unwritten: deque[Write] = deque()
        self._refreshed: dict[str, Alert] = {}  # fingerprint -> latest body rewritten in place, not yet stored
        if self.open:
            log.info("restored %d open alerts from %s", len(self.open), store.path)

    def restored(self) -> list[Alert]:
        """Copies of the alerts open when the sidecar last stopped, for the pipeline's alert book."""
        return [copied(o.alert) for o in self.open.values()]

    def retarget(self, webhooks: list[WebhookSettings], alertmanager: AlertmanagerSettings | None) -> None:
        """The delivery targets, at start and on reload; rows queued for a target that stays are kept."""
        self.targets = self._targets(webhooks, alertmanager)
        self.deliverer.set_targets(self.targets)

    def _targets(self, webhooks: list[WebhookSettings], alertmanager: AlertmanagerSettings | None) -> list[Target]:
        targets = [webhook_target(w) for w in webhooks]
        if alertmanager is not None:
            targets.append(alertmanager_target(alertmanager, self.notified_open))
        return targets

    # -- the sink (service.AlertSink) ------------------------------------------
    def __call__(self, alerts: list[Alert]) -> None:
        """Transitions with their ids (the book's), stored and queued in one transaction."""
        if not alerts:
            return
        missing = [a["fingerprint"] for a in alerts if "id" not in a]
        if missing:  # wiring: the book was not given the store's id sequence (assembly.py: AlertBook(ids=store.new_id))
            raise ValueError(f"alert transitions without an id (the AlertBook assigns them): {missing[:5]}")
        now = self.clock()
        transitions: list[Transition] = []
        closed: list[int] = []
        notify: list[Alert] = []
        bodies: dict[int, str] = {}  # id(alert) -> JSON, encoded once for the store and the outbox
        for a in alerts:
            previous = self.open.pop(a["fingerprint"], None)
            if previous is not None:
                closed.append(previous.alert["id"])
            if a["state"] == "firing":
                silenced = self.silence_for(a, now) is not None
                self.open[a["fingerprint"]] = Open(a, silenced)
                episode = a["id"]
            else:
                silenced = previous.silenced if previous is not None else False
                episode = previous.alert["id"] if previous is not None else a["id"]
            bodies[id(a)] = jsonout.dumps(a)
            transitions.append(Transition(a, episode, silenced, bodies[id(a)]))
            if not silenced:
                notify.append(a)
        rows = outbox_rows(self.targets, notify, lambda a: bodies[id(a)])
        self.unwritten.append(Write(transitions, closed, rows))
        self._bound()
        self.flush()

    def flush(self) -> bool:
        """Write what is held, oldest first; True when nothing is left."""
        while self.unwritten:
            w = self.unwritten[0]
            try:
                self.store.write(w.transitions, w.closed, w.rows)
            except (sqlite3.Error, OSError) as exc:
                held = sum(len(x.transitions) for x in self.unwritten)
                self.fault.failed(f"alert history ({held} transitions held in memory)", exc)
                return False
            self.unwritten.popleft()
            self.fault.ok()
            self.deliverer.enqueued(w.rows)
        return True

    def close(self) -> None:
        """At shutdown: a last try to write what is held; what still cannot be written is said, not hidden."""
        if not self.flush():
            held = [t.alert["id"] for w in self.unwritten for t in w.transitions]
            log.error("%d alert transitions could not be written before shutdown and are lost (ids %s): %s",
                      len(held), held, self.fault.failing)

    def _bound(self) -> None:
        held = sum(len(w.transitions) for w in self.unwritten)
        while held > MAX_UNWRITTEN and len(self.unwritten) > 1:
            lost = self.unwritten.popleft()
            held -= len(lost.transitions)
            log.error("store refused writes for too long: %d alert transitions dropped from memory (ids %s)",
                      len(lost.transitions), [t.alert["id"] for t in lost.transitions])

    def refresh(self, alerts: list[Alert]) -> None:
        """Open alerts the AlertBook rewrote in place (same id and episode, nobody paged again): their new
        body is stored (held, the latest per alert, and retried each tick while the store cannot write) and
        is what Alertmanager is re-sent from now on."""
        for a in alerts:
            if "id" not in a:  # never stored (the book had no id sequence): nothing to rewrite
                continue
            self._refreshed[a["fingerprint"]] = a
            held = self.open.get(a["fingerprint"])
            if held is not None and held.alert["id"] == a["id"]:
                held.alert = a
        self.save_refreshed()

    def save_refreshed(self) -> None:
        if not self._refreshed or self.unwritten:  # a held firing is written first (its row must exist)
            return
        try:
            self.store.refresh(list(self._refreshed.values()))
        except (sqlite3.Error, OSError) as exc:
            self.fault.failed("refresh", exc)
            return
        self._refreshed.clear()

    def silence_for(self, alert: Alert, now: float) -> Silence | None:
        return next((s for s in self.silences if s.matches(alert, now)), None)

    def notified_open(self) -> list[Alert]:
        """Open alerts that were notified (Alertmanager re-sends these)."""
        return [o.alert for o in self.open.values() if not o.silenced]

    # -- time ---------------------------------------------------------------
    async def run(self) -> None:
        """Deliveries, plus a tick for held writes and ended silences."""
        async def ticks() -> None:
            while True:
                await asyncio.sleep(TICK_SECONDS)
                try:
                    self.tick(self.clock())
                except Exception:  # the loop must outlive a bug
                    log.exception("alerts-out tick failed")

        await asyncio.gather(self.deliverer.run(), ticks())

    def tick(self, now: float) -> None:
        if not self.flush():
            return
        self.save_refreshed()
        if self.fault.failing is not None:  # nothing held, but the last write failed: is the disk back?
            try:
                self.store.probe()
            except (sqlite3.Error, OSError) as exc:
                self.fault.failed("probe", exc)
                return
            self.fault.ok()
        self.silences = [s for s in self.silences if s.until > now]
        ended = [o for o in self.open.values() if o.silenced and self.silence_for(o.alert, now) is None]
        if ended:
            rows = outbox_rows(self.targets, [o.alert for o in ended])
            try:
                self.store.unsilence([o.alert["id"] for o in ended], rows)
            except (sqlite3.Error, OSError) as exc:
                self.fault.failed("unsilence", exc)
                return
            for o in ended:
                o.silenced = False
            self.deliverer.enqueued(rows)

    # -- people -------------------------------------------------------------
    def add_silence(self, obj: Any) -> dict[str, Any]:
        """Raises SilenceError naming the bad field."""
        s = parse(obj, self.clock())
        s.id, s.created = self.store.add_silence(s.run, s.alert, s.rank, s.until, s.comment, s.created_by)
        self.silences.append(s)
        return s.as_dict()

    def list_silences(self, expired: bool = False) -> list[dict[str, Any]]:
        return self.store.silences(active_at=None if expired else self.clock())

    def expire_silence(self, silence_id: int) -> bool:
        now = self.clock()
        for s in self.silences:
            if s.id == silence_id:
                s.until = min(s.until, now)
        return self.store.expire_silence(silence_id, now)

    def acknowledge(self, alert_id: int, by: str | None = None, comment: str | None = None) -> Alert | None:
        alert = self.store.acknowledge(alert_id, by, comment)
        return self.name_targets([alert])[0] if alert is not None else None

    def redeliver(self, alert_id: int | None = None, target: str | None = None) -> int:
        """Undelivered notifications queued again: of one alert, or to one target (by name), or all."""
        key = None
        if target is not None:
            key = next((t.key for t in self.targets if target in (t.name, t.key)), None)
            if key is None:
                raise KeyError(target)
        return self.deliverer.redeliver(alert_id, key)

    def query_alerts(self, **query: Any) -> dict[str, Any]:
        """The store's history; each alert's ``delivery`` names the target as logs and metrics do."""
        page = self.store.query_alerts(**query)
        self.name_targets(page["alerts"])
        return page

    def name_targets(self, alerts: list[Alert]) -> list[Alert]:
        names = {t.key: t.name for t in self.targets}
        for a in alerts:
            for d in a.get("delivery", ()):
                d["target"] = names.get(d["target"], d["target"].split(" ", 1)[0] + " (no longer configured)")
        return alerts

    def delivery_stats(self) -> dict[str, Any]:
        return self.deliverer.delivery_stats()
