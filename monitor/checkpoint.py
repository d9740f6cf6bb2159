"""Pipeline state that survives a restart or a kill -9: a snapshot plus a journal of what came after.

Why this design (the promise of docs/operations.md, "Restart and kill -9": after a kill -9 and a restart,
every alert ends in the state it would have reached without the kill):

* The pipeline is pure: its state is a function of what it was fed, the batches (with the
  wall time each arrived at) and the timer's ticks. So the journal records exactly that,
  synchronously, before the batch's alerts go to the store; a restart feeds it again,
  with notifications off, and the detectors end where they were. Nothing here knows any
  detector's internals: a detector rewritten tomorrow is restored the same way.
* The journal is a file beside the database (``DB.journal``), appended one frame per batch or tick
  with one ``writev``: a kill -9 keeps what the kernel took, as SQLite's WAL at ``synchronous=NORMAL``
  did, at a tenth of the cost (a 1,000-record batch was ~90 WAL page frames, a write call each: about
  1 us a record). Each frame carries a sequence number; the snapshot row names the last one it covers,
  and a restore skips those (a kill between the snapshot's commit and the file's truncation replays
  nothing twice). A write that fails or is cut short is cut off again (``ftruncate``), so no frame
  ever follows a torn one.
* Replaying everything since a run started is unbounded (a 6-hour job), and replaying
  only a recent window loses latched findings (the first rank to NaN). So every
  ``SNAPSHOT_SECONDS`` the whole pipeline state (runs and their detectors) is pickled into
  one row, and the journal up to it is deleted in the same transaction: a restart loads
  the snapshot and replays at most that long a journal. Both are bounded by the limits
  (runs x ranks x each detector's window).
* A snapshot is only loaded by the same code that wrote it (a hash of the package's
  source): after an upgrade the journal alone is replayed and older open alerts fall
  back to the store's expiry. Unpickling allows only trainhealth's own classes and a few
  containers, so a doctored database cannot run code.
* Reconciling with the store: the alerts open in the store were put back in the book
  before the replay. The replay's transitions are not sent again; only the difference
  the kill left is: an alert open in the store that the replay resolved gets its
  ``resolved`` sent now, and one the replay raised that the store never got (killed
  between journal and store) is sent as ``firing``. Nothing else is sent twice.
* Wall time: the downtime is nobody's silence. Wall times in the state are shifted by
  the time between the last sign of life before the kill (the newest snapshot or journal
  entry; the timer journals a tick every second while runs are watched) and the restart,
  and verdicts wait for the clients' retries (sidecar_clock.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import math
import os
import pickle
import sqlite3
import struct
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Coroutine, Iterator, Sequence

import msgspec

from .alerts import Alert, Key, copied
from .health import Fault
from .ingest import Decoder
from .pipeline import Pipeline
from .record import Record

log = logging.getLogger(__name__)

SNAPSHOT_SECONDS = 30.0
MAX_JOURNAL_ROWS = 200_000  # while snapshots fail, the journal keeps only this many newest entries
FORMAT = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS pipeline_snapshot (
    id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL, taken REAL NOT NULL,
    code TEXT NOT NULL, state BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS pipeline_journal (
    seq INTEGER PRIMARY KEY,
    wall REAL NOT NULL,            -- the pipeline's wall time (sidecar_clock.SidecarClock) of the batch or tick
    judge_after REAL,              -- verdicts held before this wall time; NULL: none held
    records BLOB);                 -- msgpack list of records (NaN kept); NULL: a timer tick
"""
# pipeline_journal: where versions before DB.journal kept the journal; a restore still replays its rows
# (before the file's frames: they are older) and the next snapshot empties it.

# A frame of DB.journal: the length of the records that follow (0: a timer tick), the sequence number, the
# pipeline's wall time, judge_after (-inf: no verdict held), how the records are written, then the records:
# MSGPACK, a msgpack list (NaN kept); or TEXTS, the records' JSON texts as the ingest body held them, one a
# line (what the flight recorder writes: ingest.Decoder's keep_texts), read back by the decoder that took them
# live, so they give the same records; kept when the Service has them, which costs no encoding at all.
_FRAME = struct.Struct("<QQddB")
MSGPACK, TEXTS = 0, 1

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(list[Record]).decode

# Besides trainhealth's own classes, what a pipeline's state is made of.
_ALLOWED = {("collections", "deque"), ("collections", "OrderedDict"), ("collections", "defaultdict"),
            ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "complex"),
            ("array", "array"), ("array", "_array_reconstructor"), ("copyreg", "_reconstructor"),
            ("builtins", "object")}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "trainhealth" or module.startswith("trainhealth.") or (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} has no place in a trainhealth snapshot")


def code_version() -> str:
    """Changes with any source file of the sidecar (and with Python's version): a snapshot is code-specific."""
    h = hashlib.sha256(f"{FORMAT} {sys.version_info[:2]}".encode())
    root = Path(__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


class Checkpoint:
    def __init__(self, path: str, every: float = SNAPSHOT_SECONDS) -> None:
        self.path = path
        self.every = every
        # No statement cache: a cached statement keeps its bound values until it runs again, so the snapshot's
        # INSERT would hold SQLite's copy of the whole pickled state (~60 MiB at 3,000 ranks) from one snapshot
        # to the next. Statements run here only at a snapshot or a restart (the journal is a file).
        self.db = sqlite3.connect(path, isolation_level=None, cached_statements=0)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA busy_timeout=5000")
        self.db.executescript(SCHEMA)
        self.code = code_version()
        self.errors = 0  # journal or snapshot writes that failed (the next snapshot makes up for them)
        self.fault = Fault("state")  # /healthz 503 and trainhealth_state_errors_total while writes fail
        self.dirty = False
        self.cost = 0.0  # seconds the last snapshot held the event loop
        # the journal file: DB.journal; an in-memory database's is a temporary file, removed at close
        self._temporary = path == ":memory:" or path.startswith("file::memory:") or not path
        if self._temporary:
            fd, self.journal_path = tempfile.mkstemp(prefix="trainhealth-", suffix=".journal")
            os.close(fd)
        else:
            self.journal_path = f"{path}.journal"
        self.fd = os.open(self.journal_path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        # the frames in the file, oldest first, as (seq, offset): to keep only the newest MAX_JOURNAL_ROWS
        self.frames: deque[tuple[int, int]] = deque()
        self.size = 0  # bytes of whole frames: the file is cut back to this after a failed write
        self.torn = False  # a write failed and the file could not be cut back yet
        row = self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM pipeline_journal").fetchone()
        snap = self.db.execute("SELECT seq FROM pipeline_snapshot WHERE id = 1").fetchone()
        self.seq = max(row[0], snap[0] if snap else 0)  # the last sequence number given (frames go on from it)
        for seq, offset, _, _, _, _ in self._frames(read=False):
            self.frames.append((seq, offset))
            self.seq = max(self.seq, seq)
        if os.fstat(self.fd).st_size > self.size:  # a frame torn by a kill mid-write: cut off
            self._cut_back()

    def close(self) -> None:
        self.db.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            if self._temporary:
                os.unlink(self.journal_path)

    # -- writing ------------------------------------------------------------
    def fed(self, records: Sequence[Record], wall: float, judge_after: float,
            texts: Sequence[bytes] | None = None) -> None:
        """``texts``: each record's JSON text, one line that ingest.Decoder reads back as the record, or None."""
        if records:
            if texts is not None:
                self._append(wall, judge_after, b"\n".join(texts), TEXTS)
            else:
                self._append(wall, judge_after, _encode(records), MSGPACK)

    def ticked(self, wall: float, judge_after: float) -> None:
        self._append(wall, judge_after, b"", MSGPACK)

    def _append(self, wall: float, judge_after: float, blob: bytes, form: int) -> None:
        self.dirty = True
        self.seq += 1
        head = _FRAME.pack(len(blob), self.seq, wall, judge_after, form)
        try:
            if self.torn:  # never append after a partial frame
                os.ftruncate(self.fd, self.size)
                self.torn = False
            written = os.writev(self.fd, (head, blob))
            if written != len(head) + len(blob):  # cut short (a full disk)
                self.torn = True
                raise OSError(f"journal frame cut short ({written} of {len(head) + len(blob)} bytes written)")
        except OSError as exc:  # never break ingest; the next snapshot covers it
            self._cut_back()
            self._failed("journal", exc)
        else:
            self.frames.append((self.seq, self.size))
            self.size += written
            self.fault.ok()

    def _cut_back(self) -> None:
        """After a failed write: the file back to its whole frames (or, failing that, at the next write)."""
        try:
            os.ftruncate(self.fd, self.size)
            self.torn = False
        except OSError:
            self.torn = True

    def snapshot(self, pipeline: Pipeline, now: float) -> None:
        """The whole pipeline state in one row; the journal it covers goes in the same transaction."""
        if not self.dirty:
            return
        started = time.perf_counter()
        try:
            state = pickle.dumps((pipeline.runs, pipeline.detectors, pipeline.records_processed), protocol=5)
            self.db.execute("BEGIN")
            try:
                self.db.execute("INSERT OR REPLACE INTO pipeline_snapshot VALUES (1, ?, ?, ?, ?)",
                                (self.seq, now, self.code, state))
                self.db.execute("DELETE FROM pipeline_journal WHERE seq <= ?", (self.seq,))
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
            self.fault.ok()
        except (sqlite3.Error, pickle.PicklingError, TypeError, AttributeError) as exc:
            self._failed("snapshot", exc)
            self._bound_journal()
            return
        finally:
            self.cost = time.perf_counter() - started
        self.dirty = False
        self.frames.clear()  # every frame is the snapshot's now (a restore would skip them by seq anyway)
        self.size = 0
        self._cut_back()

    def _bound_journal(self) -> None:
        """Snapshots fail (a detector's state does not pickle, or the disk is full): keep the journal
        bounded (its newest MAX_JOURNAL_ROWS frames, copied to a new file); the stale snapshot goes too, so
        a restart replays the recent journal alone."""
        try:
            rows = self.db.execute("SELECT COUNT(*) FROM pipeline_journal").fetchone()[0]  # an older version's
            excess = rows + len(self.frames) - MAX_JOURNAL_ROWS
            if excess <= 0:
                return
            self.db.execute("DELETE FROM pipeline_snapshot")
            if rows:  # the oldest entries: older than the file's frames
                self.db.execute("DELETE FROM pipeline_journal WHERE seq IN "
                                "(SELECT seq FROM pipeline_journal ORDER BY seq LIMIT ?)", (excess,))
            if len(self.frames) <= MAX_JOURNAL_ROWS:
                return
        except sqlite3.Error as exc:
            self._failed("journal", exc)
            return
        while len(self.frames) > MAX_JOURNAL_ROWS:
            self.frames.popleft()
        start = self.frames[0][1]
        kept = f"{self.journal_path}.kept"
        try:
            with open(kept, "wb") as out:
                copied = start
                while copied < self.size:
                    sent = os.sendfile(out.fileno(), self.fd, copied, self.size - copied)
                    if not sent:
                        raise OSError(f"{self.journal_path} ends before its frames do")
                    copied += sent
            os.replace(kept, self.journal_path)
        except OSError as exc:
            self._failed("journal", exc)
            return
        os.close(self.fd)
        self.fd = os.open(self.journal_path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        self.frames = deque((seq, offset - start) for seq, offset in self.frames)
        self.size -= start
        self.torn = False  # the copy holds whole frames only

    def _failed(self, what: str, exc: BaseException) -> None:
        self.errors += 1
        if self.fault.failing is None:
            log.warning("state %s: cannot write to %s: after a restart the detectors may not resume exactly "
                        "where they were", what, self.path)
        self.fault.failed(what, exc)  # rate-limited: the first failure, then one a minute with a count

    def runner(self, pipeline: Pipeline, clock: Callable[[], float]) -> Callable[[], Coroutine[Any, Any, None]]:
        async def run() -> None:
            while True:  # a snapshot holds the event loop: at most 1% of the time (a huge job snapshots less often)
                await asyncio.sleep(max(self.every, 100 * self.cost))
                self.snapshot(pipeline, clock())

        return run

    # -- reading ------------------------------------------------------------
    def restore(self, pipeline: Pipeline, now: float) -> list[Alert]:
        """Rebuild ``pipeline`` (whose book holds the store's open alerts); returns what the kill left unsent."""
        started = time.perf_counter()
        row = self.db.execute("SELECT seq, taken, code, state FROM pipeline_snapshot WHERE id = 1").fetchone()
        covered = row[0] if row is not None else 0  # the snapshot's last frame: those up to it are in it
        journal = self.db.execute("SELECT wall, judge_after, records FROM pipeline_journal WHERE seq > ? "
                                  "ORDER BY seq", (covered,)).fetchall()
        journal += [(wall, judge_after if math.isfinite(judge_after) else None, (form, blob) if blob else None)
                    for seq, _, wall, judge_after, form, blob in self._frames(read=True) if seq > covered]
        if row is None and not journal:
            return []
        alive = max(([row[1]] if row else []) + ([journal[-1][0]] if journal else []))
        offset = now - alive
        if row is not None and row[2] == self.code:
            self._load(pipeline, row[3], offset)
        elif row is not None:
            log.warning("state snapshot in %s was written by another version of trainhealth: only the "
                        "journal since it is replayed; older open alerts resolve when their run expires",
                        self.path)
        before = dict(pipeline.book.open)
        transitions: list[Alert] = []
        decoder = Decoder()
        for wall, judge_after, blob in journal:
            pipeline.judge_after = -math.inf if judge_after is None else judge_after + offset
            if blob is None:
                transitions += pipeline.tick_wall(wall + offset)
                continue
            try:
                records = _records(blob, decoder)
            except (msgspec.DecodeError, ValueError, RecursionError) as exc:  # a damaged entry costs only itself
                log.warning("state journal in %s: skipped a damaged entry (%s)", self.path, exc)
                continue
            transitions += pipeline.process(records, wall=wall + offset).alerts
        pipeline.judge_after = -math.inf
        lost = lost_transitions(before, pipeline.book.open, transitions)
        unsent = [copied(a) for a in lost]  # copies: the book's own dicts stay the book's
        log.info("restored %d runs from %s (%d journal entries, %.0f s down) in %.2f s; %d alert transitions "
                 "the stop left unsent", len(pipeline.runs), self.path, len(journal), offset,
                 time.perf_counter() - started, len(unsent))
        self.dirty = True
        return unsent

    def _frames(self, read: bool) -> Iterator[tuple[int, int, float, float, int, bytes]]:
        """The journal file's whole frames in order, as (seq, offset, wall, judge_after, form, records; b""
        for a tick; b"" too unless ``read``); a torn last frame (a kill mid-write) ends it. Read to its end,
        it sets ``size`` to the bytes of the whole frames."""
        end = os.fstat(self.fd).st_size
        offset = 0
        while offset + _FRAME.size <= end:
            length, seq, wall, judge_after, form = _FRAME.unpack(os.pread(self.fd, _FRAME.size, offset))
            body = offset + _FRAME.size
            if body + length > end:
                break
            yield seq, offset, wall, judge_after, form, os.pread(self.fd, length, body) if read and length else b""
            offset = body + length
        self.size = offset

    def _load(self, pipeline: Pipeline, state: bytes, offset: float) -> None:
        try:
            runs, detectors, processed = _Unpickler(io.BytesIO(state)).load()
        except Exception as exc:  # a damaged row must not stop the sidecar from starting
            log.warning("state snapshot in %s cannot be read (%s): replaying the journal only", self.path, exc)
            return
        for run in runs.values():
            run.clock_wall += offset
            run.last_wall += offset
        for dets in detectors.values():
            for det in dets:
                det.settings = pipeline.detector_settings[det.name]  # the thresholds in force now
        pipeline.runs.update(runs)
        pipeline.detectors.update(detectors)
        pipeline.records_processed += processed
        pipeline.text.rebuild(pipeline.runs)  # the text the restored runs keep, under the same budget


def _records(entry: bytes | tuple[int, bytes], decoder: Decoder) -> list[Record]:
    """A journal entry's records: an older version's row (msgpack), or a frame's (MSGPACK or TEXTS)."""
    form, blob = entry if isinstance(entry, tuple) else (MSGPACK, entry)
    if form == TEXTS:
        return [decoder.decode_record(line) for line in blob.split(b"\n")]
    if form != MSGPACK:
        raise ValueError(f"unknown record form {form}")
    return _decode(blob)


def lost_transitions(before: dict[Key, Alert], after: dict[Key, Alert], transitions: list[Alert]) -> list[Alert]:
    """The net change a replay made to the open alerts: resolves of stored episodes, then new firings."""
    first_resolve: dict[Key, Alert] = {}
    for a in transitions:
        key = (a["run"], a["rank"], a["alert"])
        if a["state"] == "resolved" and key in before and key not in first_resolve:
            first_resolve[key] = a  # the first resolve of a key open before closes the stored episode
    out = [first_resolve[key] for key, old in before.items() if key in first_resolve and not _same(old, after.get(key))]
    out += [new for key, new in after.items() if not _same(new, before.get(key))]
    return out


def _same(a: Alert, b: Alert | None) -> bool:
    """The same episode: the object the store put back, or one the replay re-fired at the same start (an
    episode that fired, resolved and fired again within the replayed span ends where the store has it)."""
    return a is b or (b is not None and a["started_at"] == b["started_at"])
