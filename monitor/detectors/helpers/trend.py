"""Robust trends over bounded series: bucket extremes in a ring, rolling floors, Theil-Sen.

The memory detectors do not keep records. They keep one extreme per bucket
(the minimum of host memory per minute, the maximum of the GPU peak per few
steps) in a fixed-size ring, so a week-long run costs the same memory as an
hour, and they judge the trend on those summaries:

- a *floor* (the lowest bucket over a trailing span) hides sawtooths whose
  period is shorter than the span: DataLoader workers that give memory back
  each epoch, GC cycles;
- Theil-Sen (the median of pairwise slopes) ignores outliers and needs about
  three steps of a staircase before it calls the staircase a slope, so one
  allocation that stays is not a leak.
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_left, bisect_right
from collections import deque
from dataclasses import dataclass

MAX_FIT_POINTS = 40  # Theil-Sen over at most this many points (780 pairs, ~0.2 ms)
HALF_FIT_POINTS = 20  # the same for the halves of a lookback and the span before it (190 pairs)


def theil_sen(xs: list[float], ys: list[float], max_points: int = MAX_FIT_POINTS) -> float:
    """Median of pairwise slopes; points are thinned evenly to ``max_points``. (trend_test's slope,
    without its Kendall statistic: the memory detectors call this most.)"""
    n = len(xs)
    if n < 3:
        return 0.0
    if n > max_points:
        pick = [round(i * (n - 1) / (max_points - 1)) for i in range(max_points)]
        xs = [xs[i] for i in pick]
        ys = [ys[i] for i in pick]
        n = max_points
    slopes = [(ys[j] - ys[i]) / (xs[j] - xs[i]) for i in range(n - 1) for j in range(i + 1, n) if xs[j] > xs[i]]
    if not slopes:
        return 0.0
    slopes.sort()
    mid = len(slopes) // 2
    return slopes[mid] if len(slopes) % 2 else 0.5 * (slopes[mid - 1] + slopes[mid])


def trend_test(xs: list[float], ys: list[float],
               max_points: int = MAX_FIT_POINTS) -> tuple[float, float]:
    """(Theil-Sen slope, Mann-Kendall z) from the same pairs; thinned to ``max_points``.

    z is the Kendall S statistic over its standard deviation under "no trend"
    (independent, identically distributed points): about N(0, 1) for noise of
    any shape, large for a series that keeps rising.
    """
    n = len(xs)
    if n < 3:
        return 0.0, 0.0
    if n > max_points:
        pick = [round(i * (n - 1) / (max_points - 1)) for i in range(max_points)]
        xs = [xs[i] for i in pick]
        ys = [ys[i] for i in pick]
        n = max_points
    slopes = []
    kendall = 0
    for i in range(n - 1):
        xi, yi = xs[i], ys[i]
        for j in range(i + 1, n):
            dx = xs[j] - xi
            if dx > 0:
                dy = ys[j] - yi
                slopes.append(dy / dx)
                kendall += (dy > 0) - (dy < 0)
    if not slopes:
        return 0.0, 0.0
    slopes.sort()
    mid = len(slopes) // 2
    slope = slopes[mid] if len(slopes) % 2 else 0.5 * (slopes[mid - 1] + slopes[mid])
    return slope, kendall / math.sqrt(n * (n - 1) * (2 * n + 5) / 18)


def rolling_floor(points: list[tuple[float, float]], span: float) -> list[tuple[float, float]]:
    """For each (t, v) in time order: (t, min of v over (t - span, t]). O(n), monotone deque."""
    out: list[tuple[float, float]] = []
    window: deque[tuple[float, float]] = deque()
    for t, v in points:
        while window and window[-1][1] >= v:
            window.pop()
        window.append((t, v))
        while window[0][0] <= t - span:
            window.popleft()
        out.append((t, window[0][1]))
    return out


class Ring:
    """Fixed-size ring of (time, value) pairs in two float arrays (16 bytes an entry).

    ``ordered`` stays True while every time appended is >= the one before (the memory detectors'
    rings, but for a late sample folded into a fine bucket): ``items`` then finds its first entry by
    bisection and slices the arrays, instead of testing every entry in Python.
    """

    __slots__ = ("times", "values", "size", "head", "count", "ordered")

    def __init__(self, size: int) -> None:
        self.times = array("d", bytes(8 * size))
        self.values = array("d", bytes(8 * size))
        self.size, self.head, self.count = size, 0, 0
        self.ordered = True

    def append(self, t: float, v: float) -> None:
        head = self.head
        if self.count and t < self.times[head - 1]:  # head - 1 is -1 (the last slot) right after a wrap
            self.ordered = False
        self.times[head] = t
        self.values[head] = v
        self.head = (head + 1) % self.size
        if self.count < self.size:
            self.count += 1

    def __len__(self) -> int:
        return self.count

    def arrays(self) -> tuple[array[float], array[float]]:
        """(times, values), oldest first: copies made by slicing (C speed)."""
        if self.count < self.size:  # not yet wrapped: the entries are the first ``count`` slots
            return self.times[:self.count], self.values[:self.count]
        h = self.head
        return self.times[h:] + self.times[:h], self.values[h:] + self.values[:h]

    def first_since(self, times: array[float], since: float) -> int:
        """Index in ``times`` (from ``arrays``) of the first entry with time >= ``since``; only when ordered."""
        return bisect_left(times, since)

    def items(self, since: float = -math.inf) -> list[tuple[float, float]]:
        """Oldest first, those with time >= ``since``."""
        if not self.count:
            return []
        times, values = self.arrays()
        if self.ordered:
            i = self.first_since(times, since)
            return list(zip(times[i:], values[i:]))
        return [p for p in zip(times, values) if p[0] >= since]

    def min_since(self, since: float) -> float:
        """The lowest value of the entries with time >= ``since`` (inf when none)."""
        if not self.count:
            return math.inf
        if self.ordered:  # bisect the older run of slots, then the newer (no copy of the ring)
            times, values, head, size = self.times, self.values, self.head, self.size
            if self.count < size:
                return min(values[bisect_left(times, since, 0, head):head], default=math.inf)
            if head and since > times[size - 1]:  # past the older run: within the newer
                return min(values[bisect_left(times, since, 0, head):head], default=math.inf)
            i = bisect_left(times, since, head, size)
            return min(min(values[i:], default=math.inf), min(values[:head], default=math.inf))
        times, values = self.arrays()
        return min((v for t, v in zip(times, values) if t >= since), default=math.inf)

    def tail(self, n: int) -> list[float]:
        """The newest ``n`` values, oldest first."""
        n = min(n, self.count)
        if n <= 0:
            return []
        head = self.head
        if head >= n:
            return self.values[head - n:head].tolist()
        return self.values[head - n:].tolist() + self.values[:head].tolist()

    def last(self) -> tuple[float, float]:
        i = (self.head - 1) % self.size
        return self.times[i], self.values[i]


class MinBuckets:
    """Per-bucket minima of one series (bucket = ``width`` seconds), the last ``size`` closed ones.

    ``add`` returns True when a bucket closed (the moment to re-evaluate). A
    sample older than the open bucket folds into it (late records are rare and
    this is the conservative side for a minimum).
    """

    __slots__ = ("width", "ring", "index", "low", "last")

    def __init__(self, width: float, size: int) -> None:
        self.width = width
        self.ring = Ring(size)  # (bucket start time, minimum)
        self.index: int | None = None
        self.low = 0.0
        self.last = 0.0  # newest value

    def add(self, t: float, v: float) -> bool:
        idx = int(t // self.width)
        self.last = v
        if self.index is None:
            self.index, self.low = idx, v
            return False
        if idx > self.index:
            self.ring.append(self.index * self.width, self.low)
            self.index, self.low = idx, v
            return True
        if v < self.low:
            self.low = v
        return False


class DropWatch:
    """Recognises a sawtooth: memory that falls back by at least half of what it gained.

    Fed the closed bucket minima. For each drop it remembers how long the rise
    before it lasted (from the lowest point since the previous drop), so the
    caller can make its floor span longer than one tooth, from the first drop on.
    """

    __slots__ = ("trough", "trough_time", "high", "rises", "last_drop")

    def __init__(self, keep: int = 4) -> None:
        self.trough: float | None = None
        self.trough_time = 0.0
        self.high = 0.0
        self.rises: deque[float] = deque(maxlen=keep)
        self.last_drop = 0.0

    def add(self, t: float, v: float, min_drop: float) -> None:
        if self.trough is None:
            self.trough, self.trough_time, self.high = v, t, v
            return
        fall = self.high - v
        if fall >= min_drop and fall >= 0.5 * (self.high - self.trough):
            self.rises.append(t - self.trough_time)
            self.last_drop = t
            self.trough, self.trough_time, self.high = v, t, v
        elif v < self.trough:  # a new lowest point: gains count from here
            self.trough, self.trough_time, self.high = v, t, v
        elif v > self.high:
            self.high = v

    def period(self, now: float, forget_after: float) -> float:
        """Longest recent rise that ended in a drop (0 when no sawtooth is seen lately)."""
        if self.rises and now - self.last_drop > forget_after:
            self.rises.clear()
        return max(self.rises, default=0.0)


class FineBuckets:
    """Per-bucket minima with the time of each minimum (not the bucket's start), for short trends.

    ``add`` returns the closed bucket ``(time of its lowest sample, lowest value)`` when a sample
    opens a later bucket, else None. With one sample per bucket (samples sparser than the width)
    the ring holds the samples themselves, at their own times.
    """

    __slots__ = ("width", "ring", "index", "low", "low_time")

    def __init__(self, width: float, size: int) -> None:
        self.width = width
        self.ring = Ring(size)
        self.index: int | None = None
        self.low = 0.0
        self.low_time = 0.0

    def add(self, t: float, v: float) -> tuple[float, float] | None:
        idx = int(t // self.width)
        if idx == self.index:
            if v < self.low:
                self.low, self.low_time = v, t
            return None
        if self.index is None or idx < self.index:  # the first sample, or a late one: fold it in
            if self.index is None:
                self.index, self.low, self.low_time = idx, v, t
            elif v < self.low:
                self.low, self.low_time = v, t
            return None
        closed = (self.low_time, self.low)
        self.ring.append(*closed)
        self.index, self.low, self.low_time = idx, v, t
        return closed


class SlidingMin:
    """The lowest (time, value) over a trailing time window; amortised O(1) (monotone deque)."""

    __slots__ = ("span", "window")

    def __init__(self, span: float) -> None:
        self.span = span
        self.window: deque[tuple[float, float]] = deque()

    def add(self, t: float, v: float) -> tuple[float, float]:
        window = self.window
        while window and window[-1][1] >= v:
            window.pop()
        window.append((t, v))
        while window[0][0] < t - self.span:
            window.popleft()
        return window[0]


@dataclass(slots=True)
class Growth:
    """A steady rise found over one lookback of floor points."""

    rate: float  # units per second (Theil-Sen)
    rise: float  # rate x lookback
    lookback: float  # seconds
    floor_now: float


def steady_growth(floors: list[tuple[float, float]], lookbacks: list[float], *, min_rate: float,
                  min_rise: float, balance: float, short_balance: float | None = None,
                  short_lookback: float = 0.0, slack: float = 0.0) -> Growth | None:
    """The longest lookback over which the floor rises steadily, or None. ``floors`` in time order.

    Steady means: Theil-Sen rate >= ``min_rate``; rate x lookback >= ``min_rise``;
    the floor ends at least ``min_rise / 2`` above where it started (it did not
    come back); and both halves of the lookback rise, the smaller rise at least
    ``balance`` times the larger, less ``slack`` (the noise of a difference of two
    floor values). Lookbacks shorter than ``short_lookback`` use ``short_balance`` on
    the halves' own Theil-Sen slopes: a short span shows less of a saturating curve's
    bend, so it must look straighter. And the rate must be at least ``balance`` times
    the rate over the span before the lookback (where the floors reach that far back):
    the tail of a saturating curve is much slower than what came before it.
    Growth that saturates (warmup, a cache filling) has a smaller recent half; one
    allocation that stays has a flat half on one side.
    """
    if len(floors) < 3:
        return None
    t_end, f_end = floors[-1]
    times = [p[0] for p in floors]
    seen = -1
    for lookback in reversed(lookbacks):  # the longest that holds: stop at the first one
        pts = floors[bisect_left(times, t_end - lookback):]
        if len(pts) < 5 or len(pts) == seen:  # too few, or the same points as a longer lookback
            continue
        seen = len(pts)
        if f_end - pts[0][1] < 0.5 * min_rise:  # cheap test first: most calls stop here
            continue
        span = pts[-1][0] - pts[0][0]
        rate = theil_sen([p[0] for p in pts], [p[1] for p in pts])
        if rate < min_rate or rate * span < min_rise:
            continue
        t_mid = pts[0][0] + span / 2
        f_mid = next(f for t, f in pts if t >= t_mid)
        older, recent = f_mid - pts[0][1], f_end - f_mid
        if older <= 0 or recent <= 0:
            continue
        # the halves' own Theil-Sen slopes: steadier than end points under noise; a short
        # lookback sees little of a saturating curve's bend, so it must look straighter
        half = [p for p in pts if p[0] < t_mid], [p for p in pts if p[0] >= t_mid]
        older, recent = (theil_sen([p[0] for p in h], [p[1] for p in h], HALF_FIT_POINTS) for h in half)
        need = short_balance if short_balance is not None and span < short_lookback else balance
        # each half rises like the whole: a step (one allocation) leaves a flat half
        if older <= 0 or recent <= 0 or min(older, recent) < need * max(older, recent, rate) - slack:
            continue
        before = floors[bisect_left(times, pts[0][0] - span):bisect_right(times, pts[0][0])]
        if len(before) >= 5 and before[-1][0] - before[0][0] >= span / 4:
            # slower than the span before it: the tail of a curve that saturates (warmup, a cache)
            if rate < balance * theil_sen([p[0] for p in before], [p[1] for p in before], HALF_FIT_POINTS):
                continue
        return Growth(rate, rate * span, span, f_end)
    return None
