"""SQLite at ``--db``: runs and their starts, alert history, acknowledgements, silences, webhook outbox.

stdlib ``sqlite3`` in WAL mode with ``synchronous=NORMAL``: a commit is a
write() into the WAL, so a kill -9 of the sidecar loses nothing committed
(only a power cut can lose the last transactions). Writes are batched: one
transaction per ingest call at most (docs/measured.md: 0.4-0.8M rows/s batched).

One connection, used from one thread (the server's event loop); the store
holds no policy: notify.py decides what is silenced and what goes out.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Callable, Iterator, Sequence

from .. import jsonout
from ..alerts import Alert
from ..record import Record, to_obj

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run TEXT PRIMARY KEY, first_seen REAL NOT NULL, last_seen REAL NOT NULL);
CREATE TABLE IF NOT EXISTS starts (
    id INTEGER PRIMARY KEY, run TEXT NOT NULL, rank INTEGER NOT NULL, time REAL NOT NULL,
    received REAL NOT NULL, record TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS starts_by_run ON starts (run, id);
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY,          -- the transition's stable id (also in body)
    episode INTEGER NOT NULL,        -- id of the firing transition this one belongs to
    fingerprint TEXT NOT NULL, run TEXT NOT NULL, rank INTEGER, alert TEXT NOT NULL,
    state TEXT NOT NULL, severity TEXT NOT NULL, time REAL NOT NULL, received REAL NOT NULL,
    open INTEGER NOT NULL,           -- 1: a firing transition not resolved yet
    silenced INTEGER NOT NULL,       -- 1: not notified (a silence matched when it fired)
    body TEXT NOT NULL);             -- the alert object, JSON (non-finite floats as strings)
CREATE INDEX IF NOT EXISTS alerts_by_run ON alerts (run, id);
CREATE INDEX IF NOT EXISTS alerts_by_name ON alerts (alert, id);
CREATE INDEX IF NOT EXISTS alerts_open ON alerts (open) WHERE open = 1;
CREATE TABLE IF NOT EXISTS acks (
    episode INTEGER PRIMARY KEY, time REAL NOT NULL, by TEXT, comment TEXT);
CREATE TABLE IF NOT EXISTS silences (
    id INTEGER PRIMARY KEY, run TEXT NOT NULL, alert TEXT, rank INTEGER, until REAL NOT NULL,
    comment TEXT NOT NULL, created REAL NOT NULL, created_by TEXT);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY, target TEXT NOT NULL, key TEXT NOT NULL UNIQUE,
    payload TEXT NOT NULL,           -- JSON list of alert objects; rendered per target at send time
    created REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT);
CREATE INDEX IF NOT EXISTS outbox_by_target ON outbox (target, id);
CREATE TABLE IF NOT EXISTS deliveries (      -- per (alert transition, target): what became of its notification
    alert_id INTEGER NOT NULL, target TEXT NOT NULL, outbox_key TEXT NOT NULL,
    state TEXT NOT NULL,             -- pending | delivered | undelivered
    error TEXT, updated REAL NOT NULL, PRIMARY KEY (alert_id, target));
CREATE INDEX IF NOT EXISTS deliveries_by_outbox ON deliveries (outbox_key);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
"""

# The alerts table's columns copied from the alert (keys of alerts.Alert, checked by a test), then the rest.
ALERT_COLUMNS = ("id", "fingerprint", "run", "rank", "alert", "state", "severity", "time")
_alert_columns = itemgetter(*ALERT_COLUMNS)
INSERT_ALERT = (f"INSERT INTO alerts ({', '.join(ALERT_COLUMNS)}, episode, received, open, silenced, body) "
                f"VALUES ({', '.join('?' * (len(ALERT_COLUMNS) + 5))})")
RUN_TOUCH_SECONDS = 60.0  # runs.last_seen is refreshed at most this often per run
ID_RESERVE = 1000  # alert ids reserved ahead in the file: ids handed out while writes fail are never reused


@dataclass(slots=True)
class Transition:
    """One alert transition to store (the alert dict carries its ``id`` already)."""

    alert: Alert
    episode: int
    silenced: bool
    body: str  # the alert as JSON (jsonout), encoded once for the store and the outbox


@dataclass(slots=True)
class OutboxRow:
    id: int
    target: str
    key: str
    payload: str
    created: float
    attempts: int


class Store:
    def __init__(self, path: str, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self.db = sqlite3.connect(path, isolation_level=None)  # explicit transactions below
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA busy_timeout=5000")
        self.db.executescript(SCHEMA)
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(outbox)")}
        if "undelivered" not in columns:  # a store from before undelivered rows were kept
            self.db.execute("ALTER TABLE outbox ADD COLUMN undelivered INTEGER NOT NULL DEFAULT 0")
        top = self.db.execute("SELECT MAX(id) FROM alerts").fetchone()[0] or 0
        reserved = self.db.execute("SELECT value FROM meta WHERE key = 'alert_id_reserved'").fetchone()
        self._next_id = max(top, int(reserved[0]) if reserved else 0) + 1
        self._reserved = self._next_id - 1  # nothing reserved by this process yet: the first write does it
        self._touched: dict[str, float] = {}

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN")
        try:
            yield self.db
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:  # SQLite may have rolled back already (a full disk)
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute("ROLLBACK")
            raise

    # -- runs and starts ----------------------------------------------------
    def note_records(self, records: Sequence[Record]) -> None:
        """Runs seen (last_seen refreshed once a minute) and every ``start`` record: one transaction."""
        now = self.clock()
        runs = [r for r in {rec.run for rec in records}
                if now - self._touched.get(r, -RUN_TOUCH_SECONDS) >= RUN_TOUCH_SECONDS]
        starts = [(r.run, r.rank, r.time, now, jsonout.dumps(to_obj(r)))
                  for r in records if r.type == "start"]
        if not runs and not starts:
            return
        if len(self._touched) > 100_000:
            self._touched.clear()
        with self.tx() as db:
            db.executemany("INSERT INTO runs VALUES (?, ?, ?) ON CONFLICT(run) DO UPDATE "
                           "SET last_seen = excluded.last_seen", [(r, now, now) for r in runs])
            db.executemany("INSERT INTO starts (run, rank, time, received, record) VALUES (?, ?, ?, ?, ?)",
                           starts)
        for r in runs:
            self._touched[r] = now

    def runs_last_seen(self) -> dict[str, float]:
        return dict(self.db.execute("SELECT run, last_seen FROM runs").fetchall())

    def starts(self, run: str) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT record FROM starts WHERE run = ? ORDER BY id", (run,))
        return [json.loads(r[0]) for r in rows]

    # -- alerts -------------------------------------------------------------
    def new_id(self) -> int:
        """The next transition id (ids are assigned before the write so bodies can carry them)."""
        i = self._next_id
        self._next_id += 1
        return i

    def _reserve_ids(self, db: sqlite3.Connection) -> None:
        """Inside a write: keep the file's reservation ID_RESERVE ahead of the ids handed out, so an id given
        to an alert whose write failed (a full disk) is not given again after a restart."""
        if self._next_id + ID_RESERVE // 2 > self._reserved:
            ceiling = self._next_id + ID_RESERVE
            db.execute("INSERT OR REPLACE INTO meta VALUES ('alert_id_reserved', ?)", (ceiling,))
            self._reserved = ceiling

    def write(self, transitions: Sequence[Transition], closed: Sequence[int],
              outbox: Sequence[tuple[str, str, str]]) -> None:
        """Transitions, episodes they close, and outbox rows (target, key, payload): one commit."""
        now = self.clock()
        rows = [(*_alert_columns(t.alert), t.episode, now, int(t.alert["state"] == "firing"), int(t.silenced),
                 t.body) for t in transitions]
        reserved = self._reserved
        try:
            with self.tx() as db:
                self._reserve_ids(db)
                db.executemany(INSERT_ALERT, rows)
                if closed:
                    db.executemany("UPDATE alerts SET open = 0 WHERE id = ?", [(i,) for i in closed])
                self._queue(db, outbox, now)
        except BaseException:
            self._reserved = reserved
            raise

    def _queue(self, db: sqlite3.Connection, outbox: Sequence[tuple[str, str, str]], now: float) -> None:
        """Outbox rows, and a pending delivery per (alert, target) so the alert shows what became of it."""
        if not outbox:
            return
        db.executemany("INSERT INTO outbox (target, key, payload, created) VALUES (?, ?, ?, ?)",
                       [(*row, now) for row in outbox])
        db.executemany("INSERT OR REPLACE INTO deliveries VALUES (?, ?, ?, 'pending', NULL, ?)",
                       [(a["id"], target, key, now) for target, key, payload in outbox
                        for a in json.loads(payload) if isinstance(a, dict) and "id" in a])

    def refresh(self, alerts: Sequence[Alert]) -> None:
        """Open alerts rewritten in place (one incident whose picture sharpened): their stored body."""
        with self.tx() as db:
            db.executemany("UPDATE alerts SET body = ?, severity = ? WHERE id = ?",
                           [(jsonout.dumps(a), a["severity"], a["id"]) for a in alerts])

    def unsilence(self, ids: Sequence[int], outbox: Sequence[tuple[str, str, str]]) -> None:
        """Open alerts whose silence ended: now notified (one commit with their outbox rows)."""
        now = self.clock()
        with self.tx() as db:
            db.executemany("UPDATE alerts SET silenced = 0 WHERE id = ?", [(i,) for i in ids])
            self._queue(db, outbox, now)

    def probe(self) -> None:
        """A tiny write: does the file take writes again (after a full disk)? Raises if not."""
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('probe', ?)", (self.clock(),))

    def open_alerts(self) -> list[tuple[Alert, bool]]:
        """Alerts open when the sidecar stopped: (alert object, silenced), oldest first."""
        rows = self.db.execute("SELECT body, silenced FROM alerts WHERE open = 1 ORDER BY id")
        return [(json.loads(body), bool(silenced)) for body, silenced in rows]

    _SELECT = ("SELECT a.body, a.silenced, k.time, k.by, k.comment FROM alerts a "
               "LEFT JOIN acks k ON k.episode = a.episode")

    def _view(self, row: tuple[str, int, float | None, str | None, str | None]) -> Alert:
        body, silenced, ack_time, ack_by, ack_comment = row
        alert: Alert = json.loads(body)
        alert["delivery"] = [
            {"target": target, "state": state, "error": error, "updated": updated}
            for target, state, error, updated in self.db.execute(
                "SELECT target, state, error, updated FROM deliveries WHERE alert_id = ? ORDER BY target",
                (alert["id"],))]
        alert["silenced"] = bool(silenced)
        alert["acknowledged"] = ack_time is not None
        if ack_time is not None:
            alert["acknowledged_at"] = ack_time
            alert["acknowledged_by"] = ack_by
            alert["acknowledged_comment"] = ack_comment
        return alert

    def query_alerts(self, run: str | None = None, state: str | None = None, alert: str | None = None,
                     since: float | None = None, limit: int = 1000,
                     cursor: int | None = None, delivery: str | None = None) -> dict[str, Any]:
        """History, newest first. ``state=firing``: alerts open now. ``delivery``: alerts with a notification
        in that state (``undelivered``: the ones to redeliver). Page on with ``next_cursor``."""
        conditions: list[tuple[str, Any]] = [
            ("a.run = ?", run), ("a.alert = ?", alert),
            ("a.open = ?", 1) if state == "firing" else ("a.state = ?", state),  # firing: open now
            ("a.time >= ?", since), ("a.id < ?", cursor),
            ("a.id IN (SELECT alert_id FROM deliveries WHERE state = ?)", delivery),
        ]
        where = [clause for clause, value in conditions if value is not None]
        args = [value for _, value in conditions if value is not None]
        sql = self._SELECT + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY a.id DESC LIMIT ?"
        rows = self.db.execute(sql, (*args, limit + 1)).fetchall()
        alerts = [self._view(r) for r in rows[:limit]]
        return {"alerts": alerts, "next_cursor": alerts[-1]["id"] if len(rows) > limit else None}

    def get_alert(self, alert_id: int) -> Alert | None:
        row = self.db.execute(self._SELECT + " WHERE a.id = ?", (alert_id,)).fetchone()
        return self._view(row) if row else None

    def acknowledge(self, alert_id: int, by: str | None, comment: str | None) -> Alert | None:
        """Acknowledge the episode the transition ``alert_id`` belongs to; None if there is no such id."""
        row = self.db.execute("SELECT episode FROM alerts WHERE id = ?", (alert_id,)).fetchone()
        if row is None:
            return None
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO acks VALUES (?, ?, ?, ?)", (row[0], self.clock(), by, comment))
        return self.get_alert(alert_id)

    # -- silences -----------------------------------------------------------
    def add_silence(self, run: str, alert: str | None, rank: int | None, until: float, comment: str,
                    created_by: str | None) -> tuple[int, float]:
        now = self.clock()
        with self.tx() as db:
            cur = db.execute("INSERT INTO silences (run, alert, rank, until, comment, created, created_by) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (run, alert, rank, until, comment, now, created_by))
        assert cur.lastrowid is not None
        return cur.lastrowid, now

    def silences(self, active_at: float | None = None) -> list[dict[str, Any]]:
        sql = "SELECT id, run, alert, rank, until, comment, created, created_by FROM silences"
        args: tuple[Any, ...] = ()
        if active_at is not None:
            sql += " WHERE until > ?"
            args = (active_at,)
        cols = ("id", "run", "alert", "rank", "until", "comment", "created", "created_by")
        return [dict(zip(cols, row, strict=True)) for row in self.db.execute(sql + " ORDER BY id", args)]

    def expire_silence(self, silence_id: int, now: float) -> bool:
        with self.tx() as db:
            cur = db.execute("UPDATE silences SET until = MIN(until, ?) WHERE id = ?", (now, silence_id))
        return cur.rowcount > 0

    # -- outbox -------------------------------------------------------------
    def due(self, target: str, limit: int = 100, skip: Sequence[int] = ()) -> list[OutboxRow]:
        """The oldest rows still to deliver to ``target`` (``skip``: rows done but not deleted yet)."""
        rows = self.db.execute("SELECT id, target, key, payload, created, attempts FROM outbox "
                               "WHERE target = ? AND undelivered = 0 ORDER BY id LIMIT ?",
                               (target, limit + len(skip)))
        return [OutboxRow(*r) for r in rows if r[0] not in skip][:limit]

    def delivered(self, row_id: int) -> None:
        """Delivered: the row goes, its alerts show ``delivered``."""
        with self.tx() as db:
            db.execute("UPDATE deliveries SET state = 'delivered', error = NULL, updated = ? "
                       "WHERE outbox_key = (SELECT key FROM outbox WHERE id = ?)", (self.clock(), row_id))
            db.execute("DELETE FROM outbox WHERE id = ?", (row_id,))

    def undeliverable(self, row_id: int, error: str) -> None:
        """Given up on (a 4xx, or retried past give_up_after): kept as undelivered, with why, to redeliver."""
        with self.tx() as db:
            db.execute("UPDATE outbox SET undelivered = 1, last_error = ? WHERE id = ?", (error[:500], row_id))
            db.execute("UPDATE deliveries SET state = 'undelivered', error = ?, updated = ? "
                       "WHERE outbox_key = (SELECT key FROM outbox WHERE id = ?)", (error[:500], self.clock(), row_id))

    def redeliver(self, alert_id: int | None = None, target: str | None = None) -> list[str]:
        """Undelivered rows (of one alert, of one target, or all) queued again; the targets they go to."""
        where: list[str] = ["undelivered = 1"]
        args: list[Any] = []
        if alert_id is not None:
            where.append("key IN (SELECT outbox_key FROM deliveries WHERE alert_id = ?)")
            args.append(alert_id)
        if target is not None:
            where.append("target = ?")
            args.append(target)
        now = self.clock()
        with self.tx() as db:
            rows = db.execute("SELECT key, target FROM outbox WHERE " + " AND ".join(where), args).fetchall()
            db.executemany("UPDATE outbox SET undelivered = 0, attempts = 0, created = ? WHERE key = ?",
                           [(now, k) for k, _ in rows])
            db.executemany("UPDATE deliveries SET state = 'pending', error = NULL, updated = ? "
                           "WHERE outbox_key = ?", [(now, k) for k, _ in rows])
        return [t for _, t in rows]

    def attempt_failed(self, row_id: int, error: str) -> None:
        self.db.execute("UPDATE outbox SET attempts = attempts + 1, last_error = ? WHERE id = ?",
                        (error[:500], row_id))

    def pending(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT target, COUNT(*) FROM outbox WHERE undelivered = 0 "
                                    "GROUP BY target").fetchall())

    def undelivered(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT target, COUNT(*) FROM outbox WHERE undelivered = 1 "
                                    "GROUP BY target").fetchall())
