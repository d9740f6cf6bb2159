"""Prometheus text format for the per-rank families, written directly (the bulk of a scrape).

prometheus-client builds a Sample tuple and a label dict per series and formats each
through generic escaping: ~5 us per series, ~80 ms for 1,000 ranks. Here each rank's label
set is formatted once and reused by every family, and values go through ``go``, which writes what
prometheus-client's ``floatToGoString`` writes: the text is byte for byte what ``generate_latest`` writes
for the same families (labels in sorted order: ``rank`` before ``run``), at about a fifth of the cost.
The exporter keeps prometheus-client for the few service-wide families.

A scrape repeats what did not change: ``RankLines`` keeps each rank's lines (one per family) from the
previous scrape, and reuses them while the rank took no record since (its RankState and record count
are the same), so a scrape formats only the ranks that reported in between, and of those only the
values that changed; the text is the same. The lines are kept as bytes and the scrape is joined once.
"""

from __future__ import annotations

import math
import threading
from itertools import compress
from operator import ne
from typing import Callable, Iterable, Sequence

from prometheus_client.utils import floatToGoString

from .snapshot import RankRow


def escape_label_value(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def gauge_header(name: str, help_text: str) -> str:
    return f"# HELP {name} {escape_help(help_text)}\n# TYPE {name} gauge\n"


def go(value: float) -> str:
    """prometheus-client's ``floatToGoString``: the same text, its common cases first. A finite float below
    1e6 is its ``repr``; from 1e6 (byte counts, timestamps) Go writes an exponent where Python does not
    until 1e16: the digits of the ``repr``, the trailing zeros dropped, and the exponent."""
    d = value if type(value) is float else float(value)
    if -_INF < d < 1e6:
        return repr(d)
    if 1e6 <= d < 1e16:  # (not NaN nor an infinity)
        s = repr(d)  # 7 to 16 digits before the dot
        dot = s.find(".")
        digits = (s[:dot] + s[dot + 1:]).rstrip("0")
        return (f"{digits[0]}.{digits[1:]}" if len(digits) > 1 else digits) + _EXPONENT[dot]
    return _go_rest(d)


_INF = math.inf
_EXPONENT = [f"e+{dot - 1:02d}" for dot in range(17)]  # by the position of the dot in the repr (7 to 16)
_go_rest: Callable[[float], str] = floatToGoString  # prometheus-client leaves it unannotated


class RankLines:
    """Each rank's lines from the previous scrape, by (run, rank label). Renders run in worker threads:
    one at a time through the cache (the lock)."""

    def __init__(self) -> None:
        self.entries: dict[tuple[str, str], _Entry] = {}
        self.names: list[str] = []  # the families the entries' lines are for
        self.lock = threading.Lock()
        self.reused = 0  # ranks whose lines the latest render reused whole (tests, benchmarks)


class _Entry:
    """One rank's lines (one per family, UTF-8, b"" where it has no value), the values they show, the line
    prefixes (name and labels: written once per rank), the lines that show a zero, and the RankState and
    record count they are of."""

    __slots__ = ("source", "version", "values", "lines", "prefixes", "zeros")

    def __init__(self, source: object, version: int, values: list[float | None], prefixes: list[str]) -> None:
        self.source, self.version, self.values, self.prefixes = source, version, values, prefixes
        self.lines = [b"" if v is None else _line(p, v) for p, v in zip(prefixes, values)]
        self.zeros = {i for i, v in enumerate(values) if v == 0}

    def update(self, version: int, values: list[float | None]) -> None:
        """The lines whose value changed written again: a value unequal to the one before (NaN always, found
        in C: most values are unchanged), and a zero that is not the same object as before (0.0 and -0.0
        are equal but written apart)."""
        was, lines, prefixes, zeros = self.values, self.lines, self.prefixes, self.zeros
        for i in compress(range(len(values)), map(ne, values, was)):
            v = values[i]
            if v is None:
                lines[i] = b""
                zeros.discard(i)
                continue
            lines[i] = _line(prefixes[i], v)
            if v:
                zeros.discard(i)
            else:
                zeros.add(i)
        for i in tuple(zeros):
            v = values[i]
            if v is not was[i] and v == 0:  # (a zero that became None or another number was written above)
                lines[i] = _line(prefixes[i], v)
        self.version, self.values = version, values


def _line(prefix: str, v: float) -> bytes:
    d = v if type(v) is float else float(v)
    return f"{prefix}{repr(d) if -_INF < d < 1e6 else go(d)}\n".encode()  # (go's first case inline)


def per_rank_parts(runs: Iterable[tuple[str, Sequence[RankRow]]],
                   values: Sequence[tuple[str, str, str]],
                   state: Sequence[tuple[str, str, Callable[[RankRow], float | None]]],
                   cache: RankLines | None = None) -> list[bytes]:
    """The text in parts (UTF-8) for the caller to join once with the rest of the scrape: a megabyte
    copied once, not three times (each new megabyte costs page faults). ``values``: (metric name, key in
    ``row.latest``, help); ``state``: (name, help, value of a row or None to leave the series out).
    Families in that order, ranks in snapshot order within each. ``cache``: reuse the lines of ranks
    unchanged since the previous call with the same cache, and of a changed rank the lines whose value
    did not change (its GPU total, its learning rate...)."""
    if cache is None:
        return [_plain_text(runs, values, state).encode()]
    with cache.lock:
        return _parts(runs, values, state, cache)


def _plain_text(runs: Iterable[tuple[str, Sequence[RankRow]]], values: Sequence[tuple[str, str, str]],
                state: Sequence[tuple[str, str, Callable[[RankRow], float | None]]]) -> str:
    """Family by family, no cache (the first scrape, tests): the cheapest way to write every line once."""
    rows = []
    for run, run_rows in runs:
        run_label = escape_label_value(run)
        rows += [(f'{{rank="{escape_label_value(row.rank)}",run="{run_label}"}} ', row) for row in run_rows]
    out = []
    for name, key, help_text in values:
        out.append(gauge_header(name, help_text))
        out += [f"{name}{labels}{go(v)}\n" for labels, row in rows if (v := row.latest.get(key)) is not None]
    for name, help_text, get in state:
        out.append(gauge_header(name, help_text))
        out += [f"{name}{labels}{go(v)}\n" for labels, row in rows if (v := get(row)) is not None]
    return "".join(out)


def _parts(runs: Iterable[tuple[str, Sequence[RankRow]]], values: Sequence[tuple[str, str, str]],
           state: Sequence[tuple[str, str, Callable[[RankRow], float | None]]], cache: RankLines) -> list[bytes]:
    """Rank by rank (each rank's lines are what the cache keeps), then assembled family by family."""
    names = [name for name, _, _ in values] + [name for name, _, _ in state]
    if names != cache.names:  # other families: nothing to reuse
        cache.entries, cache.names = {}, names
    old = cache.entries
    kept: dict[tuple[str, str], _Entry] = {}
    per_row: list[list[bytes]] = []
    keys = [key for _, key, _ in values]
    getters = [get for _, _, get in state]
    reused = 0
    for run, run_rows in runs:
        run_label = escape_label_value(run)
        for row in run_rows:
            key = (run, row.rank)
            entry = old.get(key)
            source = row.source
            if entry is not None and entry.source is source:
                if entry.version == row.version:
                    reused += 1
                else:
                    entry.update(row.version, [*map(row.latest.get, keys), *[get(row) for get in getters]])
            else:
                labels = f'{{rank="{escape_label_value(row.rank)}",run="{run_label}"}} '
                entry = _Entry(source, row.version, [*map(row.latest.get, keys), *[get(row) for get in getters]],
                               [f"{name}{labels}" for name in names])
            if source is not None:
                kept[key] = entry
            per_row.append(entry.lines)
    cache.entries, cache.reused = kept, reused  # ranks gone since are dropped
    headers = [gauge_header(name, help_text).encode() for name, _, help_text in values]
    headers += [gauge_header(name, help_text).encode() for name, help_text, _ in state]
    out: list[bytes] = []
    for header, column in zip(headers, zip(*per_row) if per_row else [()] * len(headers)):
        out.append(header)
        out += column
    return out
