"""Flight recorder: every accepted record appended to ``DIR/RUN.jsonl``.

A record whose JSON text the ingest body held on one line (``texts``: ingest.Decoder's ``keep_texts``, the
Service's batches when a recorder is on) is written as that text, byte for byte as the client sent it (its
field order, unknown fields too): replay reads the line back through the very decoder that took it live, so it
gives the same record (a NaN sent as a bare token or a ``"nan"`` string stays one). Nothing is encoded again
(about 0.5 us a record, where encoding costs 2). Other records (a body Python's json had to read, a replay's
own writes, tests) are encoded here:

Lines are written by msgspec (one ``encode_lines`` per run and batch, written as the bytes it made: about
0.5 us a record, where Python's ``json`` took ~10). A batch whose encoding holds a ``null`` (msgspec writes NaN and the
infinities as null; a ``null`` in ``metrics`` or ``config`` is one too), or an ``end`` with its ``error``,
is written with Python's ``json`` record by record, so NaN stays the bare ``NaN`` token (replay reads it
back as NaN, never as null). Each line reads back as what ``json.dumps(record.to_obj(rec))`` wrote before
(tests/unit/test_recorder_lines.py). Files are size-capped: past ``max_bytes`` the file rotates to
``RUN.jsonl.1`` (``keep`` old files).

A write that fails (a full disk) never stops ingest: it is counted in ``fault``
(``trainhealth_recorder_errors_total``, ``/healthz`` 503 until a write works
again) and logged at most once a minute.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from operator import attrgetter
from pathlib import Path
from typing import IO, Sequence

import msgspec

from .health import Fault
from .record import Record, to_obj

log = logging.getLogger(__name__)

_encode_lines = msgspec.json.Encoder().encode_lines
_STEP, _SAMPLE_STEP = b',"step":', b',"type":"sample","step":'
_run = attrgetter("run")


def lines(records: list[Record]) -> str:
    """The records as .jsonl text (each line ends with a newline): see ``encoded``."""
    return encoded(records).decode()


def encoded(records: list[Record]) -> bytes:
    """The records as .jsonl bytes, one blob per batch: msgspec when nothing in them encodes as ``null``,
    else Python's ``json``, which keeps NaN a bare token. Every line names its ``type`` (msgspec leaves out
    the default, ``sample``: it is put back before ``step``, which every sample has and which comes right
    after ``type`` in the record's field order)."""
    try:
        blob = _encode_lines(records)
    except (TypeError, OverflowError, UnicodeEncodeError, msgspec.EncodeError):
        blob = b"null"  # what msgspec cannot write: the json path tells
    if b"null" in blob or any(rec.error is not None for rec in records):  # (to_obj writes an error whole)
        return "".join(json.dumps(to_obj(rec), separators=(",", ":")) + "\n" for rec in records).encode()
    parts = blob.split(b"\n")
    for i, rec in enumerate(records):
        if rec.type == "sample":
            parts[i] = parts[i].replace(_STEP, _SAMPLE_STEP, 1)
    return b"\n".join(parts)


class FlightRecorder:
    def __init__(self, directory: str | Path, max_bytes: int = 256 << 20, keep: int = 3,
                 max_open: int = 64) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.keep = keep
        self.max_open = max_open
        self.files: OrderedDict[str, IO[bytes]] = OrderedDict()
        self.fault = Fault("recorder")
        self._broken: set[str] = set()  # runs whose last write failed

    def path(self, run: str) -> Path:
        return self.dir / f"{run}.jsonl"  # run names are [A-Za-z0-9._:-]: no path separators

    def write(self, records: Sequence[Record], texts: Sequence[bytes] | None = None) -> None:
        """``texts``: each record's JSON text, one line without its line end (see the module's doc), or None."""
        runs = dict.fromkeys(map(_run, records))
        if len(runs) == 1:  # one run (one job's client): the batch as it is
            groups: list[tuple[str, Sequence[Record], Sequence[bytes] | None]] = [(next(iter(runs)), records, texts)]
        else:
            by_run: dict[str, list[Record]] = {run: [] for run in runs}
            for rec in records:
                by_run[rec.run].append(rec)
            texts_by_run: dict[str, list[bytes]] = {run: [] for run in runs}
            for rec, text in zip(records, texts or ()):
                texts_by_run[rec.run].append(text)
            groups = [(run, recs, texts_by_run[run] if texts is not None else None) for run, recs in by_run.items()]
        for run, recs, lines in groups:
            try:
                fh = self._open(run)
                blob = b"\n".join(lines) + b"\n" if lines is not None else encoded(list(recs))
                fh.write(b"\n" + blob if run in self._broken else blob)
                fh.flush()
                if fh.tell() >= self.max_bytes:
                    self._rotate(run)
            except OSError as exc:  # a full disk must not stop ingest
                self._drop(run)
                self.fault.failed(str(self.path(run)), exc)
            else:
                self._broken.discard(run)
                self.fault.ok()

    def _drop(self, run: str) -> None:
        """After a failed write the file may end in a partial line: close it (what is buffered is lost) and
        begin the next write with a newline, so the partial line stays one corrupt line that replay skips."""
        self._broken.add(run)
        fh = self.files.pop(run, None)
        if fh is not None:
            try:
                fh.close()
            except OSError:
                pass

    def _open(self, run: str) -> IO[bytes]:
        fh = self.files.get(run)
        if fh is not None:
            self.files.move_to_end(run)
            return fh
        if len(self.files) >= self.max_open:
            _, old = self.files.popitem(last=False)
            old.close()
        fh = open(self.path(run), "ab")
        self.files[run] = fh
        return fh

    def _rotate(self, run: str) -> None:
        self.files.pop(run).close()
        base = self.path(run)
        for i in range(self.keep - 1, 0, -1):
            older = base.with_name(f"{base.name}.{i}")
            if older.exists():
                os.replace(older, base.with_name(f"{base.name}.{i + 1}"))
        os.replace(base, base.with_name(f"{base.name}.1"))

    def close(self) -> None:
        for fh in self.files.values():
            fh.close()
        self.files.clear()
