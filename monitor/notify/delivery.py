"""Delivery from the outbox: at least once, in order per target, never blocking ingest.

One asyncio task per target (a webhook, an Alertmanager) on the server's event
loop. It posts the oldest outbox row of its target; a 2xx deletes the row; a
connection error, a timeout, 408/425/429 or a 5xx keeps it and waits an
exponential backoff with jitter before trying again (rows behind it wait too,
so a receiver sees firing before resolved); any other status, or a row older
than ``give_up_after`` that still fails, is dropped, counted ``failed`` and
logged. A row is deleted only after the receiver answered, so a kill -9
mid-delivery re-sends it after the restart, with the same ``Idempotency-Key``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Awaitable, Callable, Sequence

import httpx

from .. import jsonout
from ..alerts import Alert
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
    timeout: float = 10.0
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    give_up_after: float = 86400.0


@dataclass
class TargetStats:
    name: str
    kind: str
    ok: int = 0
    retry: int = 0
    failed: int = 0
    pending: int = 0
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
    stats: dict[str, TargetStats] = field(init=False)

    def __post_init__(self) -> None:
        self.stats = {t.key: TargetStats(t.name, t.kind) for t in self.targets}
        self._wake = {t.key: asyncio.Event() for t in self.targets}
        pending = self.store.pending()
        for key, n in pending.items():
            if key in self.stats:
                self.stats[key].pending = n
            else:
                log.warning("%d undelivered notifications in the outbox for %s, which is no longer "
                            "configured; they stay there until it is", n, key)

    def enqueued(self, rows: Sequence[tuple[str, str, str]]) -> None:
        for key, _, _ in rows:
            self.stats[key].pending += 1
            self._wake[key].set()

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
            await asyncio.gather(*(self._worker(t, client) for t in self.targets))

    async def _worker(self, t: Target, client: httpx.AsyncClient) -> None:
        wake = self._wake[t.key]
        next_refresh = 0.0
        while True:
            try:
                wake.clear()
                rows = self.store.due(t.key, 1)
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
        if result == "retry" and now - row.created > t.give_up_after:
            result, error = "failed", f"{error}; giving up after {now - row.created:.0f}s"
        setattr(st, result, getattr(st, result) + 1)
        if result == "retry":
            st.last_error = error
            self.store.attempt_failed(row.id, error)
            delay = backoff(row.attempts + 1, t.backoff_initial, t.backoff_max, self.rng)
            log.warning("notification %s to %s failed (%s); retrying in %.1fs", row.key, t.name, error, delay)
            return delay
        self.store.delivered(row.id)
        st.pending = max(0, st.pending - 1)
        if result == "failed":
            st.last_error = error
            log.error("notification %s to %s dropped: %s", row.key, t.name, error)
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
            resp = await client.post(t.url, content=body, headers=headers, timeout=t.timeout)
        except httpx.HTTPError as exc:
            return "retry", f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        except (httpx.InvalidURL, httpx.UnsupportedProtocol, ValueError) as exc:  # will never work
            return "failed", f"{type(exc).__name__}: {exc}"
        if 200 <= resp.status_code < 300:
            return "ok", ""
        error = f"HTTP {resp.status_code}: {resp.text[:200]}"
        return ("retry" if resp.status_code >= 500 or resp.status_code in RETRYABLE else "failed"), error
