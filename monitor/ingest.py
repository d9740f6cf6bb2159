"""Body decoding: bytes on the wire -> validated Records plus a reason per rejected one.

Fast path: msgspec decodes the whole body into ``list[Record]`` strictly (~2M
records/s). Any body it refuses (bare ``NaN``/``Infinity`` tokens, ``"nan"``
strings, one bad record) takes the slow path: Python's ``json`` (which reads
the bare tokens), then each record is validated on its own, so one bad record
costs only itself. ``null`` always stays "not measured".

Bounded cost: before anything is decoded, a body longer than ``max_values`` bytes has its commas,
``[``, ``{`` and line ends counted (C speed, no allocation): an upper bound on the JSON values it
holds, so on the objects any decoder can build from it. Over the limit it is refused (413) unread:
a 60 KB gzip body of 20M empty arrays no longer costs 1.5 GB. The slow path then reads an array one
element at a time and stops at the record cap (``max_records``), never holding the whole body as
Python objects. docs/operations.md states the figures.

A ``Decoder`` owns the bounded cache of run names that passed the pattern (a
regex per record was 40% of decoding a body, and a batch carries the same few
names over and over): the Service and replay each hold one, so no state is
shared between them or across tests. ``decode_body()`` decodes with a fresh one.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import msgspec

from .record import Record, RecordError, RunNames, big_int, check, from_obj, loads

_array_decoder = msgspec.json.Decoder(list[Record])
_texts_decoder = msgspec.json.Decoder(list[msgspec.Raw])  # each element's JSON text, not decoded (C speed)
_record_decoder = msgspec.json.Decoder(Record)
BOM = b"\xef\xbb\xbf"
_INF = float("inf")
_NOT_WS = re.compile(r"[^ \t\n\r]")
_scan = json.JSONDecoder().raw_decode
_scan_big = json.JSONDecoder(parse_int=big_int).raw_decode  # an integer past Python's 4300-digit limit
VALUE_MARKS = b",[{\n\r"  # every JSON value but the first of a container follows one (a line: a record)
# A body this short is not counted: whatever its shape, decoding it costs at most about 35 MB (measured:
# 1 MiB of "[]," or of '"k1":{},' in a config), and counting would cost a quarter of decoding a
# 1000-record batch. Only larger bodies pay the pass.
COUNT_FROM = 1 << 20
_NOT_MARKS = bytes(b for b in range(256) if b not in VALUE_MARKS)  # deleted: len() of what is left counts them

JSON_TYPES = {"application/json", "text/json"}
NDJSON_TYPES = {"application/x-ndjson", "application/ndjson", "application/jsonl",
                "application/x-jsonlines", "application/jsonlines", "text/plain"}


class BodyError(ValueError):
    """The whole body is unusable; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class Rejection:
    index: int
    field: str
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "field": self.field, "reason": self.reason}


@dataclass(slots=True)
class Decoded:
    records: list[Record] = field(default_factory=list)
    indexes: list[int] = field(default_factory=list)  # batch position of each record
    rejected: list[Rejection] = field(default_factory=list)
    # By batch position: each record's JSON text as the body held it, one line that ``Decoder.decode_record``
    # reads back as the very record decoded here (see ``Decoder``'s ``keep_texts``); None: not kept.
    texts: list[bytes] | None = None


def gunzip(body: bytes, limit: int) -> bytes:
    """Every member of a gzip body (``cat a.gz b.gz`` is valid gzip), at most ``limit`` bytes out."""
    out: list[bytes] = []
    size = 0
    rest = body
    while True:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            chunk = d.decompress(rest, limit - size + 1)
        except zlib.error as exc:
            raise BodyError(400, f"Content-Encoding gzip: body is not valid gzip ({exc})") from None
        size += len(chunk)
        if size > limit or d.unconsumed_tail:
            raise BodyError(413, f"body decompresses to more than {limit} bytes (limits.max_decoded_bytes)")
        if not d.eof:
            raise BodyError(400, "Content-Encoding gzip: body is truncated")
        out.append(chunk)
        rest = d.unused_data
        if not rest.strip(b"\0"):  # trailing zero padding is allowed by gzip tools
            return b"".join(out)


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


class Decoder:
    """Decodes ingest bodies and single records, remembering the run names that passed (bounded).

    ``keep_texts``: a ``Decoded`` also carries each record's JSON text as the body held it (``texts``), so the
    flight recorder writes the bytes that came instead of encoding the records again (about 1.5 us a record
    less). Kept only where a line of it is read back by ``decode_record`` exactly as the body's record was
    decoded: an NDJSON body's lines (each was decoded on its own by the same calls), and the elements of a
    JSON array that msgspec took whole, when the body holds no line end (a line end in an element would split
    it). Anything else (an array read by Python's json: NaN tokens, a bad record; one object) keeps none."""

    def __init__(self, max_run_names: int = 10_000, keep_texts: bool = False) -> None:
        self.runs = RunNames(max_run_names)
        self.keep_texts = keep_texts

    def decode_record(self, text: bytes | str) -> Record:
        """One record's JSON text (a .jsonl line); raises RecordError for a bad record, ValueError or
        RecursionError for text that is not JSON."""
        try:  # fast path; bare NaN tokens and bad records take the checked slow path
            return check(_record_decoder.decode(text), self.runs)
        except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
            return from_obj(loads(text), self.runs)

    def decode_body(self, body: bytes, content_type: str | None = None, content_encoding: str | None = None,
                    *, max_records: int = 20_000, max_decoded_bytes: int = 64 << 20,
                    max_values: int = 500_000, count_from: int = COUNT_FROM) -> Decoded:
        """Decode a JSON array, one JSON object, or NDJSON; raises BodyError for the whole body. Bodies of
        ``count_from`` bytes or less are not counted against ``max_values`` (see COUNT_FROM)."""
        encoding = (content_encoding or "identity").strip().lower()
        if encoding == "gzip":
            body = gunzip(body, max_decoded_bytes)
        elif encoding not in ("identity", ""):
            raise BodyError(415, f"Content-Encoding {encoding!r} is not supported (use gzip or none)")
        kind = media_type(content_type)
        if body.startswith(BOM):  # some clients (PowerShell, Windows editors) start UTF-8 with a BOM
            body = body[len(BOM):]
        stripped = body.lstrip()
        if not stripped:
            raise BodyError(400, "empty body: send a JSON array of records or NDJSON")
        if len(body) > max(max_values, count_from):  # a shorter body cannot hold more values than bytes
            values = len(body.translate(None, _NOT_MARKS))  # one pass, about 1 ms per MB
            if values > max_values:
                raise BodyError(413, f"body holds up to {values} JSON values (commas, '[', '{{' and line ends "
                                     f"counted), the limit is {max_values} (limits.max_values_per_batch): "
                                     "send smaller batches")
        if kind in NDJSON_TYPES:
            return self._decode_lines(body, max_records)
        if kind not in JSON_TYPES and kind != "":
            hint = " (curl -d sends that unless told: add -H 'content-type: application/json')" \
                if kind == "application/x-www-form-urlencoded" else ""
            raise BodyError(415, f"Content-Type {kind!r} is not supported{hint}: use application/json "
                                 "(an array of records) or application/x-ndjson")
        if stripped[:1] == b"[":
            return self._decode_array(body, max_records)
        if stripped[:1] == b"{":
            return self._decode_object(body, max_records)
        raise BodyError(400, "body must be a JSON array of records, a JSON object, or NDJSON")


    def _decode_array(self, body: bytes, max_records: int) -> Decoded:
        try:
            records = _array_decoder.decode(body)
        except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
            pass  # bad record, non-finite tokens, or bad JSON: the slow path tells which
        else:
            if len(records) > max_records:
                raise _too_many(len(records), max_records)
            out = self._checked(records)
            if self.keep_texts and b"\n" not in body and b"\r" not in body:
                out.texts = list(map(bytes, _texts_decoder.decode(body)))  # bytes: joining Raws is slower
            return out
        out = Decoded()
        for i, item in enumerate(_array_items(body.decode("utf-8", "surrogateescape"), max_records)):
            self._add(out, i, item)
        return out


    def _decode_object(self, body: bytes, max_records: int) -> Decoded:
        """One JSON object (compact or pretty-printed), or NDJSON sent as application/json."""
        out = Decoded()
        try:
            out.records.append(check(_record_decoder.decode(body), self.runs))
            out.indexes.append(0)
            return out
        except RecordError as exc:
            out.rejected.append(Rejection(0, exc.field, exc.reason))
            return out
        except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
            pass
        try:
            item = loads(body)
        except (ValueError, RecursionError):  # more than one value: NDJSON; or bad JSON, judged line by line
            return self._decode_lines(body, max_records)
        self._add(out, 0, item)
        return out


    def _decode_lines(self, body: bytes, max_records: int) -> Decoded:
        """NDJSON: one record per non-blank line (LF or CRLF); a bad line costs only itself."""
        lines = [ln for ln in body.splitlines() if ln.strip()]
        if len(lines) > max_records:
            raise _too_many(len(lines), max_records)
        out = Decoded(texts=lines if self.keep_texts else None)
        decode = _record_decoder.decode
        for i, line in enumerate(lines):
            try:  # fast path, one line at a time (as fast as one joined array, and a line is one record)
                rec = decode(line)
            except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
                pass
            else:
                try:
                    out.records.append(check(rec, self.runs))
                    out.indexes.append(i)
                except RecordError as exc:
                    out.rejected.append(Rejection(i, exc.field, exc.reason))
                continue
            try:
                item = loads(line)
            except RecursionError:
                out.rejected.append(Rejection(i, "$", "record is nested too deeply"))
                continue
            except (ValueError, UnicodeDecodeError) as exc:
                out.rejected.append(Rejection(i, "$", f"line is not valid JSON: {exc}"))
                continue
            if isinstance(item, list):
                out.rejected.append(Rejection(i, "$", "line is a JSON array: NDJSON holds one record object per "
                                                      "line; send an array as application/json"))
                continue
            self._add(out, i, item)
        return out


    def _add(self, out: Decoded, index: int, item: Any) -> None:
        try:
            out.records.append(from_obj(item, self.runs))
            out.indexes.append(index)
        except RecordError as exc:
            out.rejected.append(Rejection(index, exc.field, exc.reason))
        except RecursionError:
            out.rejected.append(Rejection(index, "$", "record is nested too deeply"))


    def _checked(self, records: list[Record]) -> Decoded:
        # fast path: check()'s rules in one comprehension; any record they flag goes through check()
        good_runs = self.runs.good
        if not [r for r in records if r.run not in good_runs or not 0.0 <= r.time < _INF
                or (r.step is None and r.type != "start")
                or (r.phase_time is not None and not 0.0 <= r.phase_time < _INF)]:
            return Decoded(records, list(range(len(records))))
        out = Decoded()
        for i, rec in enumerate(records):
            try:
                out.records.append(check(rec, self.runs))
                out.indexes.append(i)
            except RecordError as exc:
                out.rejected.append(Rejection(i, exc.field, exc.reason))
        return out


def decode_body(body: bytes, content_type: str | None = None, content_encoding: str | None = None,
                *, max_records: int = 20_000, max_decoded_bytes: int = 64 << 20,
                max_values: int = 500_000, count_from: int = COUNT_FROM) -> Decoded:
    """``Decoder().decode_body``: one body with a fresh run-name cache (tests, one-off decoding)."""
    return Decoder().decode_body(body, content_type, content_encoding, max_records=max_records,
                                 max_decoded_bytes=max_decoded_bytes, max_values=max_values, count_from=count_from)


def _array_items(text: str, max_records: int) -> Iterator[Any]:
    """The elements of a JSON array, one at a time (Python's json: it reads bare NaN/Infinity), so that no
    more than one element is ever held as Python objects at once and the record cap stops the reading.
    Raises BodyError: 400 for text that is not one JSON array, 413 at the element past ``max_records``."""
    i = _skip(text, 0)
    if text[i:i + 1] != "[":
        raise BodyError(400, "body must be a JSON array of records")
    i = _skip(text, i + 1)
    n = 0
    if text[i:i + 1] != "]":
        while True:
            n += 1
            if n > max_records:
                raise BodyError(413, f"batch has more than {max_records} records, the limit is {max_records} "
                                     "(limits.max_records_per_batch): send smaller batches")
            try:
                try:
                    item, i = _scan(text, i)
                except json.JSONDecodeError:
                    raise
                except ValueError:  # an integer past the digit limit: out of range for every field
                    item, i = _scan_big(text, i)
            except RecursionError:
                raise BodyError(400, "body is nested too deeply") from None
            except ValueError as exc:
                raise BodyError(400, f"body is not valid JSON: {exc}") from None
            yield item
            i = _skip(text, i)
            mark = text[i:i + 1]
            if mark == "]":
                break
            if mark != ",":
                raise BodyError(400, f"body is not valid JSON: expected ',' or ']' at char {i}")
            i = _skip(text, i + 1)
    if _skip(text, i + 1) != len(text):
        raise BodyError(400, f"body is not valid JSON: extra data at char {_skip(text, i + 1)}")


def _skip(text: str, i: int) -> int:
    """The index of the first non-whitespace character at or after ``i`` (``len(text)`` if none)."""
    found = _NOT_WS.search(text, i)
    return found.start() if found else len(text)


def _too_many(n: int, limit: int) -> BodyError:
    return BodyError(413, f"batch has {n} records, the limit is {limit} "
                          "(limits.max_records_per_batch): send smaller batches")
