"""Delivery from the outbox: at least once, in order per target, never blocking ingest.

One asyncio task per target (a webhook, an Alertmanager) on the server's event
loop. It posts the oldest outbox row of its target; a 2xx deletes the row; a
connection error, a timeout, 408/425/429 or a 5xx keeps it and waits an
exponential backoff with jitter before trying again (rows behind it wait too,
so a receiver sees firing before resolved); any other status, or a row older
than ``give_up_after`` that still fails, is kept in the outbox as undelivered
(its alerts show the target and the reason in ``GET /v1/alerts``, counted
``failed`` and in ``trainhealth_webhook_undelivered``) until someone redelivers
it. A row is deleted only after the receiver answered, so a kill -9
mid-delivery re-sends it after the restart, with the same ``Idempotency-Key``.

The store may refuse writes (a full disk): a row the receiver took but whose
delete failed is remembered here and never posted again by this process (the
delete is retried); a failed attempt counter is kept in memory too.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
import sqlite3
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Awaitable, Callable, Sequence

import httpx

from .. import jsonout
from ..alerts import Alert
from ..config import RetryPolicy
from ..config.rules import redacted
from ..health import Fault
from .store import OutboxRow, Store

log = logging.getLogger(__name__)

USER_AGENT = "trainhealth"
SIGNATURE_HEADER = "X-Trainhealth-Signature"
RETRYABLE = {408, 425, 429}


def _all(alerts: list[Alert]) -> list[list[Alert]]:
    return [alerts]


@dataclass(kw_only=True)
class Target:
    """Where notifications go and how they look; built by webhooks.py and alertmanager.py."""

    key: str  # stable identity of the target in the outbox
    name: str  # for logs and metrics: no secrets (a URL path may hold one)
    kind: str  # "webhook" | "alertmanager"
    url: str
    render: Callable[[list[Alert], float], bytes]  # (alerts of one row, now) -> body
    accepts: Callable[[Alert], bool] = lambda alert: True
    split: Callable[[list[Alert]], list[list[Alert]]] = _all  # accepted transitions -> one row each
    refresh: Callable[[], list[Alert]] | None = None  # re-sent while nothing is queued (Alertmanager)
    refresh_seconds: float = 60.0
    secret: str | None = None
    retry: RetryPolicy  # timeout, backoff, give_up_after: the same policy for every kind of target


@dataclass
class TargetStats:
    name: str
    kind: str
    ok: int = 0
    retry: int = 0
    failed: int = 0
    pending: int = 0
    undelivered: int = 0
    refresh_ok: int = 0
    refresh_failed: int = 0
    last_error: str | None = None


def sign(secret: str, body: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 of the exact body bytes with the shared secret."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def backoff(attempts: int, initial: float, maximum: float, rng: random.Random) -> float:
    """Exponential (initial * 2^(attempts-1), capped) with equal jitter: uniform in [d/2, d]."""
    d = min(maximum, initial * 2.0 ** min(attempts - 1, 40))
    return rng.uniform(d / 2, d)


def outbox_rows(targets: Sequence[Target], alerts: list[Alert],
                encode: Callable[[Alert], str] = jsonout.dumps) -> list[tuple[str, str, str]]:
    """(target key, idempotency key, payload) for each notification these transitions make.

    ``encode`` turns one alert into JSON; pass the encodings already made to encode each alert once.
    """
    rows = []
    for t in targets:
        mine = [a for a in alerts if t.accepts(a)]
        for group in t.split(mine) if mine else []:
            rows.append((t.key, uuid.uuid4().hex, "[" + ",".join(map(encode, group)) + "]"))
    return rows


@dataclass
class Deliverer:
    store: Store
    targets: list[Target]
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep
    rng: random.Random = field(default_factory=random.Random)
    transport: httpx.AsyncBaseTransport | None = None  # tests and proxies; default: real network
    fault: Fault = field(default_factory=lambda: Fault("store"))  # the store's write health
    stats: dict[str, TargetStats] = field(init=False)

    def __post_init__(self) -> None:
        self.stats = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._done: dict[int, str | None] = {}  # row id -> None: delivered, or why it is undeliverable
        self._attempts: dict[int, int] = {}  # row id -> failed attempts, when the store cannot count them
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._client: httpx.AsyncClient | None = None
        self.set_targets(self.targets)
        for key, n in self.store.pending().items():
            if key not in self.stats:
                log.warning("%d undelivered notifications in the outbox for %s, which is no longer "
                            "configured; they stay there until it is", n, redacted(key))

    def set_targets(self, targets: list[Target]) -> None:
        """The configured targets (at start and on reload): workers start for new ones, stop for gone ones."""
        pending, undelivered = self.store.pending(), self.store.undelivered()
        old = self.stats
        self.targets = list(targets)
        self.stats = {t.key: old.get(t.key) or TargetStats(t.name, t.kind) for t in targets}
        for t in targets:
            st = self.stats[t.key]
            st.name, st.pending, st.undelivered = t.name, pending.get(t.key, 0), undelivered.get(t.key, 0)
            self._wake.setdefault(t.key, asyncio.Event()).set()
        for key in [k for k in self._workers if k not in self.stats]:
            self._workers.pop(key).cancel()
        if self._client is not None:
            self._start_workers()

    def enqueued(self, rows: Sequence[tuple[str, str, str]]) -> None:
        for key, _, _ in rows:
            if key in self.stats:
                self.stats[key].pending += 1
                self._wake[key].set()

    def redeliver(self, alert_id: int | None = None, target: str | None = None) -> int:
        """Undelivered rows queued again (one alert's, one target's, or all); how many."""
        keys = self.store.redeliver(alert_id, target)
        for key in keys:
            if key in self.stats:
                st = self.stats[key]
                st.undelivered, st.pending = max(0, st.undelivered - 1), st.pending + 1
                self._wake[key].set()
        return len(keys)

    def delivery_stats(self) -> dict[str, Any]:
        """Counters for the metrics exporter: deliveries by result, outbox depth, per target."""
        per = list(self.stats.values())
        return {
            "deliveries": {r: sum(getattr(s, r) for s in per) for r in ("ok", "retry", "failed")},
            "outbox_depth": sum(s.pending for s in per),
            "targets": [asdict(s) for s in per],
        }

    async def run(self) -> None:
        async with httpx.AsyncClient(transport=self.transport, headers={"User-Agent": USER_AGENT}) as client:
            self._client = client
            try:
                self._start_workers()
                await asyncio.Event().wait()  # until cancelled at shutdown
            finally:
                for task in self._workers.values():
                    task.cancel()
                await asyncio.gather(*self._workers.values(), return_exceptions=True)
                self._workers.clear()
                self._client = None

    def _start_workers(self) -> None:
        assert self._client is not None
        for t in self.targets:
            if t.key not in self._workers:
                self._workers[t.key] = asyncio.create_task(self._worker(t.key, self._client))

    def _settle(self) -> None:
        """Retry the store writes that failed after a receiver answered (a delete, an undelivered mark)."""
        for row_id, error in list(self._done.items()):
            try:
                self.store.delivered(row_id) if error is None else self.store.undeliverable(row_id, error)
            except sqlite3.Error as exc:
                self.fault.failed("outbox", exc)
                return
            del self._done[row_id]
            self._attempts.pop(row_id, None)

    async def _worker(self, key: str, client: httpx.AsyncClient) -> None:
        wake = self._wake[key]
        next_refresh = 0.0
        while True:
            t = next((t for t in self.targets if t.key == key), None)  # a reload may change its secret, format
            if t is None:  # no longer configured (a reload removed it)
                return
            try:
                wake.clear()
                self._settle()
                rows = self.store.due(t.key, 1, skip=tuple(self._done))
                if rows:
                    delay = await self._deliver(t, client, rows[0])
                    if delay:
                        await self.sleep(delay)  # new rows must not cut a backoff short
                    continue
                now = self.clock()
                if t.refresh is not None and now >= next_refresh:
                    ok = await self._refresh(t, client, now)
                    next_refresh = now + (t.refresh_seconds if ok else min(t.refresh_seconds, 10.0))
                    continue
                timeout = next_refresh - now if t.refresh is not None else None
                if self._done:
                    timeout = min(timeout or 1.0, 1.0)  # come back to retry the store
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(wake.wait(), timeout)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not end deliveries for good
                log.exception("delivery to %s failed unexpectedly", t.name)
                await self.sleep(1.0)

    async def _deliver(self, t: Target, client: httpx.AsyncClient, row: OutboxRow) -> float:
        """Post one row; the seconds to wait before the next attempt (0: go on)."""
        st = self.stats[t.key]
        now = self.clock()
        try:
            body = t.render(json.loads(row.payload), now)
        except Exception as exc:  # a row that cannot be rendered never will be
            result, error = "failed", f"cannot render payload: {exc!r}"
        else:
            result, error = await self._post(t, client, body, row.key)
        if result == "retry" and now - row.created > t.retry.give_up_after:
            result, error = "failed", f"{error}; giving up after {now - row.created:.0f}s"
        setattr(st, result, getattr(st, result) + 1)
        if result == "retry":
            st.last_error = error
            attempts = max(row.attempts, self._attempts.get(row.id, 0)) + 1
            self._attempts[row.id] = attempts
            try:
                self.store.attempt_failed(row.id, error)
            except sqlite3.Error as exc:
                self.fault.failed("outbox", exc)
            delay = backoff(attempts, t.retry.backoff_initial, t.retry.backoff_max, self.rng)
            log.warning("notification %s to %s failed (%s); retrying in %.1fs", row.key, t.name, error, delay)
            return delay
        st.pending = max(0, st.pending - 1)
        if result == "failed":
            st.last_error = error
            st.undelivered += 1
            log.error("notification %s to %s undeliverable, kept for redelivery: %s", row.key, t.name, error)
        self._done[row.id] = None if result == "ok" else error
        self._settle()
        return 0.0

    async def _refresh(self, t: Target, client: httpx.AsyncClient, now: float) -> bool:
        assert t.refresh is not None
        alerts = t.refresh()
        if not alerts:
            return True
        result, error = await self._post(t, client, t.render(alerts, now), None)
        st = self.stats[t.key]
        if result == "ok":
            st.refresh_ok += 1
            return True
        st.refresh_failed += 1
        st.last_error = error
        log.warning("re-sending %d firing alerts to %s failed: %s", len(alerts), t.name, error)
        return False

    async def _post(self, t: Target, client: httpx.AsyncClient, body: bytes,
                    key: str | None) -> tuple[str, str]:
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["Idempotency-Key"] = key
        if t.secret:
            headers[SIGNATURE_HEADER] = sign(t.secret, body)
        try:
            resp = await client.post(t.url, content=body, headers=headers, timeout=t.retry.timeout)
        except httpx.HTTPError as exc:
            return "retry", f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        except (httpx.InvalidURL, httpx.UnsupportedProtocol, ValueError) as exc:  # will never work
            return "failed", f"{type(exc).__name__}: {exc}"
        if 200 <= resp.status_code < 300:
            return "ok", ""
        error = f"HTTP {resp.status_code}: {resp.text[:200]}"
        return ("retry" if resp.status_code >= 500 or resp.status_code in RETRYABLE else "failed"), error
