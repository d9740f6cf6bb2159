"""Alerts out: the alert sink that stores every transition and notifies what no silence covers.

Per ingest call (or timer tick) with transitions, one SQLite transaction holds
the transitions, the episodes they close and the outbox rows of every target
that wants them; delivery.py then posts from the outbox in the background.

Restart: alerts open when the sidecar stopped are put back into the AlertBook,
so a detector's later ``resolved`` closes them and a repeated ``firing`` stays
deduplicated. Detector state is not kept (DESIGN.md), so a restored alert whose
condition ended while the sidecar was down resolves when its run expires: by
the pipeline (``limits.run_ttl_seconds`` after its last record) if the run
sends again, or here, that long after the run was last seen before the restart.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import jsonout
from ..alerts import Alert
from ..events import resolved
from .alertmanager import AlertmanagerSettings
from .alertmanager import target as alertmanager_target
from .delivery import Deliverer, outbox_rows
from .silences import Silence, parse
from .store import Store, Transition
from .webhooks import WebhookSettings
from .webhooks import target as webhook_target

if TYPE_CHECKING:
    from ..service import Service

log = logging.getLogger(__name__)

TICK_SECONDS = 1.0


@dataclass(slots=True)
class Open:
    alert: Alert  # the same dict the AlertBook holds
    silenced: bool  # not notified yet: a silence matched when it fired
    restored: bool = False  # from the store, its run not seen since the restart


class AlertsOut:
    def __init__(self, store: Store, service: Service, webhooks: list[WebhookSettings],
                 alertmanager: AlertmanagerSettings | None = None) -> None:
        self.store = store
        self.service = service
        self.clock = service.clock
        self.targets = [webhook_target(w) for w in webhooks]
        if alertmanager is not None:
            self.targets.append(alertmanager_target(alertmanager, self.notified_open))
        self.deliverer = Deliverer(store, self.targets, clock=self.clock)
        self.silences = [Silence(**s) for s in store.silences(active_at=self.clock())]
        self.open: dict[str, Open] = {}
        for alert, silenced in store.open_alerts():
            service.book.restore(alert)
            self.open[alert["fingerprint"]] = Open(alert, silenced, restored=True)
        self._last_seen = store.runs_last_seen() if self.open else {}
        self._started = self.clock()
        if self.open:
            log.info("restored %d open alerts from %s", len(self.open), store.path)

    # -- the sink -----------------------------------------------------------
    def __call__(self, alerts: list[Alert]) -> None:
        self.save_refreshed()
        if not alerts:
            return
        now = self.clock()
        transitions: list[Transition] = []
        closed: list[int] = []
        notify: list[Alert] = []
        bodies: dict[int, str] = {}  # id(alert) -> JSON, encoded once for the store and the outbox
        for a in alerts:
            a["id"] = self.store.new_id()
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
        self.store.write(transitions, closed, rows)
        self.deliverer.enqueued(rows)

    def save_refreshed(self) -> None:
        """Open alerts the AlertBook rewrote in place (same episode, nobody paged again): store their body."""
        book = self.service.book
        if book.refreshed:
            done = [a for a in book.refreshed.values() if "id" in a]
            book.refreshed.clear()
            if done:
                self.store.refresh(done)

    def silence_for(self, alert: Alert, now: float) -> Silence | None:
        return next((s for s in self.silences if s.matches(alert, now)), None)

    def notified_open(self) -> list[Alert]:
        """Open alerts that were notified (Alertmanager re-sends these)."""
        return [o.alert for o in self.open.values() if not o.silenced]

    # -- time ---------------------------------------------------------------
    async def run(self) -> None:
        """Deliveries, plus a tick for ended silences and restored alerts whose run never came back."""
        async def ticks() -> None:
            while True:
                await asyncio.sleep(TICK_SECONDS)
                try:
                    self.tick(self.clock())
                except Exception:  # the loop must outlive a bug or a full disk
                    log.exception("alerts-out tick failed")

        await asyncio.gather(self.deliverer.run(), ticks())

    def tick(self, now: float) -> None:
        self.save_refreshed()
        self.silences = [s for s in self.silences if s.until > now]
        ended = [o for o in self.open.values() if o.silenced and self.silence_for(o.alert, now) is None]
        if ended:
            for o in ended:
                o.silenced = False
            rows = outbox_rows(self.targets, [o.alert for o in ended])
            self.store.unsilence([o.alert["id"] for o in ended], rows)
            self.deliverer.enqueued(rows)
        self._expire_restored(now)

    def _expire_restored(self, now: float) -> None:
        ttl = self.service.settings.limits.run_ttl_seconds
        runs = self.service.pipeline.runs
        expired: dict[str, list[Alert]] = {}
        for o in self.open.values():
            if not o.restored:
                continue
            run = o.alert["run"]
            if run in runs:
                o.restored = False  # the pipeline expires it like any alert of a live run
            elif now - self._last_seen.get(run, self._started) > ttl:
                expired.setdefault(run, []).append(o.alert)
        for run, alerts in expired.items():
            idle = now - self._last_seen.get(run, self._started)
            why = f"run {run} expired after {idle:.0f}s without records (alert restored after a restart)"
            events = [resolved(a["alert"], a["rank"], a["step"], now, why) for a in alerts]
            self.service.dispatch(self.service.book.apply(run, events))

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
        return self.store.acknowledge(alert_id, by, comment)

    def delivery_stats(self) -> dict[str, Any]:
        return self.deliverer.delivery_stats()
