"""Prometheus text format for the per-rank families, written directly (the bulk of a scrape).

prometheus-client builds a Sample tuple and a label dict per series and formats each
through generic escaping: ~5 us per series, ~80 ms for 1,000 ranks. Here the text is written a run and a
family at a time (a column: the family's lines of one run, ranks in snapshot order) from a template, the
family's name and each rank's labels baked in, filled with the column's values by one ``%``; values go
through ``go``, which writes what prometheus-client's ``floatToGoString`` writes: the text is byte for byte
what ``generate_latest`` writes for the same families (labels in sorted order: ``rank`` before ``run``).
The exporter keeps prometheus-client for the few service-wide families.

A scrape repeats what did not change: ``RankLines`` keeps each column's values, template and text from the
previous scrape. A run whose ranks all took no record since (the same RankState and record count each) is
reused whole; otherwise each column's values are read and compared in C (``map`` and list equality), and
only the columns that changed are written again (when only a few of the run's ranks took a record, only
their values are read, compared and formatted). The text is the same; it is kept as bytes and the scrape
is joined once. Columns, not ranks, because the text is family by family and because most families change in
every rank or in none between two scrapes (a rank sends a record every step, a scrape comes every few
seconds): a column is then one ``%`` and one ``encode`` for a thousand lines, where a rank's line each was
a Python call.
"""

from __future__ import annotations

import math
import threading
from itertools import compress, repeat
from operator import attrgetter, is_, ne
from typing import Callable, Iterable, Sequence, cast

from prometheus_client.utils import floatToGoString

from .snapshot import RankRow


def escape_label_value(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def gauge_header(name: str, help_text: str) -> str:
    return f"# HELP {name} {escape_help(help_text)}\n# TYPE {name} gauge\n"


def go(value: float) -> str:
    """prometheus-client's ``floatToGoString``: the same text, its common case first (a finite float below
    1e6 is its ``repr``)."""
    d = value if type(value) is float else float(value)
    return repr(d) if -_INF < d < 1e6 else _go_large(d)


def _go_large(d: float) -> str:
    """``go`` of a float that is not finite or not below 1e6. From 1e6 (byte counts, timestamps) Go writes an
    exponent where Python does not until 1e16: the digits of the ``repr``, the trailing zeros dropped, and
    the exponent."""
    if not 1e6 <= d < 1e16:  # NaN, an infinity, from 1e16 on (an exponent in Python too), below -1e6
        return _go_rest(d)
    s = repr(d)  # 7 to 16 digits before the dot
    dot = s.find(".")
    if s[-2:] != ".0":  # (a fraction in a shortest repr has no trailing zero)
        return f"{s[0]}.{s[1:dot]}{s[dot + 1:]}{_EXPONENT[dot]}"
    digits = s[:dot].rstrip("0")  # a whole number: its trailing zeros dropped
    return (f"{digits[0]}.{digits[1:]}" if len(digits) > 1 else digits) + _EXPONENT[dot]


_INF = math.inf
_EXPONENT = [f"e+{dot - 1:02d}" for dot in range(17)]  # by the position of the dot in the repr (7 to 16)
_go_rest: Callable[[float], str] = floatToGoString  # prometheus-client leaves it unannotated


class RankLines:
    """The per-rank text of the previous scrape, run by run (by run name). Renders run in worker threads:
    one at a time through the cache (the lock)."""

    def __init__(self) -> None:
        self.runs: dict[str, _RunLines] = {}
        self.names: list[str] = []  # the families the columns are for
        self.lock = threading.Lock()
        self.reused = 0  # ranks that took no record since the previous render (tests, benchmarks)


class _RunLines:
    """One run's columns, one per family, and the ranks they are of: each rank's RankState and record count
    (``source`` and ``version`` of its row) and its labels, ``{rank="0",run="job"} %s\\n`` (``%`` doubled)."""

    __slots__ = ("sources", "versions", "labels", "columns")

    def __init__(self, run: str, rows: Sequence[RankRow], sources: list[object], versions: list[int],
                 names: list[str]) -> None:
        self.sources, self.versions = sources, versions
        run_label = _template_text(escape_label_value(run))
        self.labels = [f'{{rank="{_template_text(escape_label_value(row.rank))}",run="{run_label}"}} %s\n'
                       for row in rows]
        self.columns = [_Column(_template_text(name)) for name in names]


class _Column:
    """One family's lines of one run: the values shown (one per rank, None where the rank has none), the text
    of each (per rank, "" where none), which ranks have a line (None: all of them), the template of those
    lines and the column's text."""

    __slots__ = ("name", "values", "texts", "present", "template", "text")

    def __init__(self, name: str) -> None:
        self.name = name
        self.values: list[float | None] | None = None  # None: never written
        self.texts: list[str | float] = []  # (a float: one whose str is its text)
        self.present: list[bool] | None = None
        self.template = ""
        self.text = b""

    def update(self, values: list[float | None], labels: list[str]) -> None:
        """Written again, every value (C-level maps where it can), unless every value is as before
        (``_same``): most columns are all equal or all changed when many ranks took a record since."""
        was = self.values
        if was is None or not _same(values, was):
            self.values = values
            self._write_all(values, labels)

    def update_ranks(self, ranks: list[int], values: list[float | None], labels: list[str]) -> None:
        """``update`` when a few ranks took a record since (heartbeats, a step half reported): ``ranks``
        their positions in the run and ``values`` theirs now; the other ranks' values are as they were.
        Only the changed values are formatted again (all of them when a rank gained or lost one)."""
        was = cast(list[float | None], self.values)  # (written before: the run is not new)
        before = list(map(was.__getitem__, ranks))
        if _same(values, before):
            return
        now = was.copy()
        for i, v in zip(ranks, values):
            now[i] = v
        self.values = now
        texts = self.texts
        for j in _changed(values, before):
            v = values[j]
            if v is None or before[j] is None:  # (keys are only added: rare after a run's first scrapes)
                self._write_all(now, labels)
                return
            texts[ranks[j]] = go(v)
        self._fill()

    def _write_all(self, values: list[float | None], labels: list[str]) -> None:
        present = [v is not None for v in values] if None in values else None
        if not self.template or present != self.present:
            lines = labels if present is None else list(compress(labels, present))
            self.template = self.name + self.name.join(lines) if lines else ""
            self.present = present
        if present is None:  # a float whose text is its repr as it is: % writes it, in C (go's first case)
            self.texts = [d if -_INF < d < 1e6 else _go_large(d) for d in map(float, cast(list[float], values))]
        else:
            self.texts = ["" if v is None else go(v) for v in values]
        self._fill()

    def _fill(self) -> None:
        texts = self.texts if self.present is None else compress(self.texts, self.present)
        self.text = (self.template % tuple(texts)).encode()


def _same(values: list[float | None], was: list[float | None]) -> bool:
    """Every value equal to the one before (in C) and no zero a new object: 0.0 and -0.0 are equal but
    written apart; an unchanged rank's zero is the same object, a changed rank's a new one."""
    return values == was and (0 not in values or all(map(is_, values, was)))


def _changed(values: list[float | None], was: list[float | None]) -> list[int]:
    """Where ``values`` must be written again: unequal to the value before (NaN always, found in C), or a
    zero that is a new object (-0.0 where 0.0 was is equal)."""
    changed = list(compress(range(len(values)), map(ne, values, was)))
    if 0 in values:
        changed += [i for i, v in enumerate(values) if v == 0 and v is not was[i]]
    return changed


def _template_text(text: str) -> str:
    return text.replace("%", "%%")


_SOURCE, _VERSION, _LATEST = attrgetter("source"), attrgetter("version"), attrgetter("latest")


def _read(rows: Sequence[RankRow], keys: list[str],
          getters: list[Callable[[RankRow], float | None]]) -> list[list[float | None]]:
    """Each family's values of ``rows``: a family at a time, in C (``map``)."""
    latest = list(map(_LATEST, rows))
    return [list(map(dict.get, latest, repeat(key))) for key in keys] + [list(map(get, rows)) for get in getters]


def per_rank_parts(runs: Iterable[tuple[str, Sequence[RankRow]]],
                   values: Sequence[tuple[str, str, str]],
                   state: Sequence[tuple[str, str, Callable[[RankRow], float | None]]],
                   cache: RankLines | None = None) -> list[bytes]:
    """The text in parts (UTF-8) for the caller to join once with the rest of the scrape: a megabyte
    copied once, not three times (each new megabyte costs page faults). ``values``: (metric name, key in
    ``row.latest``, help); ``state``: (name, help, value of a row or None to leave the series out).
    Families in that order, runs in snapshot order within each, ranks in snapshot order within a run.
    ``cache``: reuse the text of what did not change since the previous call with the same cache (without
    one, everything is written: the same code, nothing kept)."""
    if cache is None:
        cache = RankLines()
    with cache.lock:
        return _parts(runs, values, state, cache)


def _parts(runs: Iterable[tuple[str, Sequence[RankRow]]], values: Sequence[tuple[str, str, str]],
           state: Sequence[tuple[str, str, Callable[[RankRow], float | None]]], cache: RankLines) -> list[bytes]:
    """Run by run (a run's columns are what the cache keeps: a run moves in the order of runs whole), then
    assembled family by family. A family's values of a run's ranks are read at once (``map``, in C)."""
    names = [name for name, _, _ in values] + [name for name, _, _ in state]
    if names != cache.names:  # other families: nothing to reuse
        cache.runs, cache.names = {}, names
    old = cache.runs
    kept: dict[str, _RunLines] = {}
    per_run: list[list[_Column]] = []
    keys = [key for _, key, _ in values]
    getters = [get for _, _, get in state]
    reused = 0
    for run, rows in runs:
        sources, versions = list(map(_SOURCE, rows)), list(map(_VERSION, rows))
        lines = old.get(run)
        if lines is not None and len(sources) == len(lines.sources) and all(map(is_, sources, lines.sources)):
            if versions == lines.versions:  # no rank took a record since: every column as it was
                reused += len(rows)
                kept[run] = lines
                per_run.append(lines.columns)
                continue
            moved = list(compress(range(len(rows)), map(ne, versions, lines.versions)))
            reused += len(rows) - len(moved)
            lines.versions = versions
            keep = True
            if len(moved) * 4 < len(rows):  # a few ranks took a record: only theirs read and compared
                for column, values_now in zip(lines.columns, _read([rows[i] for i in moved], keys, getters)):
                    column.update_ranks(moved, values_now, lines.labels)
                kept[run] = lines
                per_run.append(lines.columns)
                continue
        else:  # a new run, or its ranks are not the same ones in the same order: every column written
            lines = _RunLines(run, rows, sources, versions, names)
            keep = not any(map(is_, sources, repeat(None)))  # (a row built without its RankState: never reused)
        for column, values_now in zip(lines.columns, _read(rows, keys, getters)):
            column.update(values_now, lines.labels)
        if keep and run not in kept:  # (a run name twice in one snapshot: the first one's text is kept)
            kept[run] = lines
        per_run.append(lines.columns)
    cache.runs, cache.reused = kept, reused  # runs gone since are dropped
    headers = [gauge_header(name, help_text).encode() for name, _, help_text in values]
    headers += [gauge_header(name, help_text).encode() for name, help_text, _ in state]
    out: list[bytes] = []
    for j, header in enumerate(headers):
        out.append(header)
        out += [columns[j].text for columns in per_run]
    return out
