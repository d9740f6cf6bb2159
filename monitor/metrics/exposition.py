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
a Python call. A column costs about 2 us beyond its lines, which many small runs feel (256 runs of 4 ranks are
4,864 columns): a render without a cache writes every run's ranks as one column per family, and a run keeps
its columns in a few lists, not an object each (fewer objects for the garbage collector to count).
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
    """One run's text, a column per family (the family's lines of the run's ranks, UTF-8), and the ranks it is
    of: each rank's RankState and record count (``source`` and ``version`` of its row) and its labels,
    ``{rank="0",run="job"} %s\\n`` (``%`` doubled). Column ``j`` is kept as ``values[j]``, the values shown
    (one per rank, None where the rank has none), ``present[j]``, which ranks have a line (None: all of them),
    ``templates[j]``, those lines with ``%s`` where the values go, ``texts[j]``, the text of each value (per
    rank, "" where none; None until a few-ranks update needs them), and ``text[j]``, the column's text.

    Lists by column, not an object per column: a thousand runs of a few ranks would make 20,000 objects for
    the garbage collector to count at a first scrape, and the collections they set off scan every run's state
    (256 runs of 4 ranks: a first render twice the time of writing its lines)."""

    __slots__ = ("sources", "versions", "labels", "values", "present", "templates", "texts", "text")

    def __init__(self, labels: list[str], sources: list[object], versions: list[int]) -> None:
        self.sources, self.versions, self.labels = sources, versions, labels
        self.values: list[list[float | None]] | None = None  # None: never written
        self.present: list[list[bool] | None] = []
        self.templates: list[str] = []
        self.texts: list[list[str | float] | None] = []  # (a float: one whose str is its text)
        self.text: list[bytes] = []

    def update(self, table: list[list[float | None]], names: list[str]) -> None:
        """``table``: each column's values now (``_read``). A column is written again, every value (C-level maps
        where it can), unless every value is as before (``_same``): most columns are all equal or all changed
        when many ranks took a record since. ``names``: the families' names (``%`` doubled)."""
        was = self.values
        self.values = table
        if was is None:  # the run's first text: every column
            n = len(table)
            self.present, self.templates, self.texts, self.text = [None] * n, [""] * n, [None] * n, [b""] * n
            changed: Iterable[int] = range(n)
        else:
            changed = [j for j, (now, before) in enumerate(zip(table, was)) if not _same(now, before)]
        for j in changed:
            self._write(j, names[j])

    def update_ranks(self, ranks: list[int], table: list[list[float | None]], names: list[str]) -> None:
        """``update`` when a few ranks took a record since (heartbeats, a step half reported): ``ranks``
        their positions in the run and ``table`` their values now; the other ranks' values are as they were.
        Only the changed values are formatted again (a column's all when a rank gained or lost one)."""
        columns = cast(list[list[float | None]], self.values)  # (written before: the run is not new)
        for j, values in enumerate(table):
            was = columns[j]
            before = list(map(was.__getitem__, ranks))
            if _same(values, before):
                continue
            now = columns[j] = was.copy()
            for i, v in zip(ranks, values):
                now[i] = v
            changed = _changed(values, before)
            if any(values[k] is None or before[k] is None for k in changed):  # (keys are only added: rare)
                self._write(j, names[j])
                continue
            texts = self.texts[j]
            if texts is None:  # the first few-ranks update of this column since it was written whole
                texts = self.texts[j] = _texts(was, self.present[j])
            for k in changed:
                texts[ranks[k]] = go(cast(float, values[k]))
            self._fill(j, texts)

    def _write(self, j: int, name: str) -> None:
        """Column ``j`` written whole from its values (its template made again when ranks gained or lost a line)."""
        values = cast(list[list[float | None]], self.values)[j]
        present = [v is not None for v in values] if None in values else None
        if not self.templates[j] or present != self.present[j]:
            lines = self.labels if present is None else list(compress(self.labels, present))
            self.templates[j] = name + name.join(lines) if lines else ""
            self.present[j] = present
        texts = _texts(values, present)
        if self.texts[j] is not None:  # kept for the few-ranks updates this column had
            self.texts[j] = texts
        self._fill(j, texts)

    def _fill(self, j: int, texts: list[str | float]) -> None:
        present = self.present[j]
        self.text[j] = (self.templates[j] % tuple(texts if present is None else compress(texts, present))).encode()


def _texts(values: list[float | None], present: list[bool] | None) -> list[str | float]:
    """The text of each value ("" where none; ``present``: None when every rank has one)."""
    if present is None:  # a float whose text is its repr as it is: % writes it, in C (go's first case)
        return [d if -_INF < d < 1e6 else _go_large(d) for d in map(float, cast(list[float], values))]
    return ["" if v is None else go(v) for v in values]


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


def _labels(run: str, rows: Sequence[RankRow]) -> list[str]:
    """Each rank's labels and the place of its value: ``{rank="0",run="job"} %s\n`` (``%`` doubled)."""
    run_label = _template_text(escape_label_value(run))
    return [f'{{rank="{_template_text(escape_label_value(row.rank))}",run="{run_label}"}} %s\n' for row in rows]


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
    one, everything is written and nothing kept: the ranks of every run as one run, a column per family)."""
    names = [name for name, _, _ in values] + [name for name, _, _ in state]
    templated = [_template_text(name) for name in names]
    keys = [key for _, key, _ in values]
    getters = [get for _, _, get in state]
    if cache is None:  # (a column per run and family costs ~2 us more than its lines: 256 runs of 4 ranks, 10 ms)
        every: list[RankRow] = []
        labels: list[str] = []
        for run, rows in runs:
            every += rows
            labels += _labels(run, rows)
        lines = _RunLines(labels, [], [])
        lines.update(_read(every, keys, getters), templated)
        return _assembled(values, state, [lines.text])
    with cache.lock:
        return _assembled(values, state, _parts(runs, names, templated, keys, getters, cache))


def _parts(runs: Iterable[tuple[str, Sequence[RankRow]]], names: list[str], templated: list[str], keys: list[str],
           getters: list[Callable[[RankRow], float | None]], cache: RankLines) -> list[list[bytes]]:
    """Each run's text, column by column: run by run (a run's columns are what the cache keeps: a run moves in
    the order of runs whole). A family's values of a run's ranks are read at once (``map``, in C)."""
    if names != cache.names:  # other families: nothing to reuse
        cache.runs, cache.names = {}, names
    old = cache.runs
    kept: dict[str, _RunLines] = {}
    per_run: list[list[bytes]] = []
    reused = 0
    for run, rows in runs:
        sources, versions = list(map(_SOURCE, rows)), list(map(_VERSION, rows))
        lines = old.get(run)
        if lines is not None and len(sources) == len(lines.sources) and all(map(is_, sources, lines.sources)):
            if versions == lines.versions:  # no rank took a record since: every column as it was
                reused += len(rows)
                kept[run] = lines
                per_run.append(lines.text)
                continue
            moved = list(compress(range(len(rows)), map(ne, versions, lines.versions)))
            reused += len(rows) - len(moved)
            lines.versions = versions
            keep = True
            if len(moved) * 4 < len(rows):  # a few ranks took a record: only theirs read and compared
                lines.update_ranks(moved, _read([rows[i] for i in moved], keys, getters), templated)
                kept[run] = lines
                per_run.append(lines.text)
                continue
        else:  # a new run, or its ranks are not the same ones in the same order: every column written
            lines = _RunLines(_labels(run, rows), sources, versions)
            keep = not any(map(is_, sources, repeat(None)))  # (a row built without its RankState: never reused)
        lines.update(_read(rows, keys, getters), templated)
        if keep and run not in kept:  # (a run name twice in one snapshot: the first one's text is kept)
            kept[run] = lines
        per_run.append(lines.text)
    cache.runs, cache.reused = kept, reused  # runs gone since are dropped
    return per_run


def _assembled(values: Sequence[tuple[str, str, str]],
               state: Sequence[tuple[str, str, Callable[[RankRow], float | None]]],
               per_run: list[list[bytes]]) -> list[bytes]:
    """Family by family: its header, then its column of each run in order."""
    headers = [gauge_header(name, help_text).encode() for name, _, help_text in values]
    headers += [gauge_header(name, help_text).encode() for name, help_text, _ in state]
    out: list[bytes] = []
    for j, header in enumerate(headers):
        out.append(header)
        out += [text[j] for text in per_run]
    return out
