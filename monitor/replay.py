"""Read recorded records (.jsonl, .jsonl.gz) for ``trainhealth replay``.

Corrupt lines are counted and skipped, never fatal. Several files (one per rank,
or rotated pieces) are merged by record time.
"""

from __future__ import annotations

import gzip
import heapq
from dataclasses import dataclass, field
from operator import attrgetter
from typing import IO, Iterable, Iterator

import msgspec

from .ingest import Decoder
from .record import Record, RecordError, check

_decode = msgspec.json.Decoder(Record).decode  # as Decoder.decode_record's fast path
_time = attrgetter("time")


@dataclass(slots=True)
class ReadStats:
    records: int = 0
    skipped: int = 0
    first_errors: list[str] = field(default_factory=list)

    def skip(self, where: str, why: str) -> None:
        self.skipped += 1
        if len(self.first_errors) < 5:
            self.first_errors.append(f"{where}: {why}")


def _open(path: str) -> IO[str]:
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def read_file(path: str, stats: ReadStats, decoder: Decoder | None = None) -> Iterator[Record]:
    decoder = decoder or Decoder()
    # Decoder.decode_record's fast path written out (every line takes it): a blank line fails it too, and is
    # told apart only then, so a good line is not copied by a strip
    fast, runs, slow = _decode, decoder.runs, decoder.decode_record
    lineno = 0
    with _open(path) as fh:
        try:
            for line in fh:
                lineno += 1
                try:
                    rec = check(fast(line), runs)
                except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
                    if not line.strip():
                        continue
                    try:  # the slow path names what is wrong (or reads bare NaN tokens and huge integers)
                        rec = slow(line)
                    except RecordError as exc:
                        stats.skip(f"{path}:{lineno}", str(exc))
                        continue
                    except (ValueError, RecursionError) as exc:
                        stats.skip(f"{path}:{lineno}", f"not valid JSON: {exc}")
                        continue
                except RecordError as exc:
                    stats.skip(f"{path}:{lineno}", str(exc))
                    continue
                stats.records += 1
                yield rec
        except (OSError, EOFError) as exc:  # truncated gzip: keep what was read
            stats.skip(f"{path}:{lineno + 1}", f"file ends early ({exc})")


def read_files(paths: Iterable[str], stats: ReadStats) -> Iterator[Record]:
    decoder = Decoder()  # one run-name cache for all the files
    streams = [read_file(p, stats, decoder) for p in paths]
    if len(streams) == 1:
        return streams[0]
    return heapq.merge(*streams, key=_time)
