"""What one scrape shows, as plain copies: the data both the collector and the text writer read.

Its own module so that the collector (collector.py) and the fast text writer (exposition.py) both depend
on it and not on each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class RankRow:
    """One rank's exported values; ``rank`` is already the label text. ``source`` and ``version`` (the
    RankState and its record count) let the text writer reuse the rank's lines from the previous scrape
    while it took no record since (exposition.RankLines); None: never reused."""

    rank: str
    step: int
    last_time: float
    ended: bool
    latest: dict[str, float]
    loss_nonfinite_step: int | None = None
    source: object = None
    version: int = -1
    series: int = 0  # how many per-rank series it shows (the series cap)


@dataclass(slots=True)
class Snapshot:
    """Copies of everything a scrape shows; safe to read from another thread."""

    runs: list[tuple[str, list[RankRow]]] = field(default_factory=list)
    firing: dict[tuple[str, str, str], int] = field(default_factory=dict)
    runs_tracked: int = 0
    ranks_tracked: int = 0
    omitted: dict[str, int] = field(default_factory=lambda: {"ended": 0, "series_cap": 0})
    accepted: int = 0
    batches: int = 0
    alerts_raised: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    refused: dict[int, int] = field(default_factory=dict)
    latency: tuple[tuple[float, ...], list[int], float] | None = None  # bounds, counts, sum
    bodies: tuple[int, int, int] | None = None  # request bodies: bytes held, their limit, refusals
    deliveries: dict[str, float] | None = None
    outbox: float | None = None
