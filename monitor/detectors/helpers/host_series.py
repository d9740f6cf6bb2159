"""One watched host-memory series (a rank's memory, or a machine's negated available memory).

Two time scales, fed from the same samples (see host_memory.py for the rules and why):

- fine buckets (``fast_bucket_seconds``, 5 s): the minimum of each, with its time, in a ring
  covering ``fast_window_seconds`` (10 min), and the lowest point of that window (a monotone
  deque). The *fast* check runs on them at every closed fine bucket: it costs O(1) unless the
  rise since the lowest point already forecasts exhaustion soon;
- minute buckets (``bucket_seconds``), fed the closed fine minima: the *steady* check (floors,
  Theil-Sen over doubling lookbacks) runs on them at every closed minute.

Everything is bounded: two rings, a deque no longer than the fine ring, a few sawtooth periods.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from statistics import median

from ...config.rules import flag, fraction, ordered, positive
from .trend import (
    DropWatch,
    FineBuckets,
    Growth,
    MinBuckets,
    SlidingMin,
    rolling_floor,
    steady_growth,
    theil_sen,
)

MB = 1e6
HOUR = 3600.0
JITTER_BUCKETS = 31  # recent buckets from which the noise of the minima is estimated
NOISE_RISE = 6.0  # a rise must also exceed this many sigma of that noise (~2.5 sigma of the samples)
NOISE_DROP = 8.0  # and a sawtooth's fall this many
SHORT_LOOKBACK = 1800.0  # lookbacks shorter than this use short_balance
FAST_FIT_POINTS = 24  # Theil-Sen of the fast check over at most this many points (276 pairs)
FINE, MINUTE = 1, 2  # what Series.add closed
RISE = 4  # ... and, with FINE, that the sample is fast_min_growth_mb above the fine window's lowest minimum
FAST_RECHECK = 30.0  # seconds between re-judgements of an open fast alert
FILL_BEND = 0.8  # within the fast horizon, a fill must bend this much (recent rate / older rate) to be judged one
PLATEAU_MARGIN = 1.25  # a fill's estimated remaining growth may exceed the headroom by this much
SEASONAL_BALANCE = 0.85  # its newer differences against its older ones: a cache filling under it shrinks them
SEASONAL_POINTS = 4  # minutes of period-lagged differences the seasonal check needs
RECENT_SAMPLES = 48  # raw samples kept for the short check (40 s at one a second)


def jitter(values: list[float]) -> float:
    """Robust standard deviation of the noise of a series (MAD of its centred differences)."""
    if len(values) < 3:
        return 0.0
    diffs = [values[i + 1] - values[i] for i in range(len(values) - 1)]
    mid = median(diffs)
    return 1.4826 * median(abs(d - mid) for d in diffs) / math.sqrt(2)


@dataclass(kw_only=True, slots=True)
class HostMemoryLeakSettings:
    enabled: bool = True
    bucket_seconds: float = 60.0  # one minimum per bucket is all the steady check keeps
    window_seconds: float = 7200.0  # the longest lookback: slow leaks are judged over it
    min_window_seconds: float = 1200.0  # the shortest lookback of the steady check
    floor_seconds: float = 180.0  # trailing span of the floor (longer when a sawtooth is seen)
    warmup_seconds: float = 300.0  # the steady check ignores a process's first minutes
    min_rate_mb_per_hour: float = 100.0  # slower growth is not reported
    min_growth_mb: float = 256.0  # the floor must rise this much over a lookback (noise guard)
    sawtooth_drop_mb: float = 128.0  # a fall this big (and 8 sigma of the noise, and half the
    # gain since the last low) is a sawtooth: the floor span then covers its period
    balance: float = 0.5  # both halves of a lookback must rise, the smaller >= balance x the larger
    short_balance: float = 0.65  # the same for lookbacks under 30 min: straighter, as they see less bend
    critical_hours: float = 2.0  # severity critical when memory runs out sooner than this
    warning_hours: float = 24.0  # warning sooner than this; info beyond (slow growth on a big machine)
    machine_horizon_hours: float = 6.0  # machine alert when available memory runs out sooner
    fast_bucket_seconds: float = 5.0  # fine buckets of the fast check (never wider than bucket_seconds)
    fast_window_seconds: float = 600.0  # the longest rise the fast check looks back over
    fast_min_seconds: float = 40.0  # the shortest sustained rise it reports
    fast_horizon_seconds: float = 420.0  # it reports any sustained rise that exhausts memory this soon,
    fast_lead: float = 4.0  # and one whose time left is at most fast_lead x how long it has risen
    fast_balance: float = 0.75  # the recent half of the rise >= fast_balance x the older half
    fast_min_growth_mb: float = 64.0  # and it rose at least this much (and 6 sigma of its noise)
    short_min_seconds: float = 10.0  # the short check: a rise this long whose time left is within
    # fast_lead x its age (a leak killing within ~40-60 s) is reported before fast_min_seconds
    near_fraction: float = 0.9  # usage under a limit at this fraction of it and rising: a page now
    near_rise_fraction: float = 0.01  # "rising": up this fraction of the limit over near_seconds
    near_seconds: float = 30.0

    def __post_init__(self) -> None:
        section = "detectors.host_memory_leak"
        flag(self, section, "enabled")
        positive(self, section, "bucket_seconds", "window_seconds", "min_window_seconds",
                 "floor_seconds", "warmup_seconds", "min_rate_mb_per_hour", "min_growth_mb",
                 "sawtooth_drop_mb", "critical_hours", "warning_hours", "machine_horizon_hours",
                 "fast_bucket_seconds", "fast_window_seconds", "fast_min_seconds",
                 "fast_horizon_seconds", "fast_lead", "fast_min_growth_mb", "short_min_seconds",
                 "near_rise_fraction", "near_seconds")
        fraction(self, section, "balance", "short_balance", "fast_balance", "near_fraction")
        ordered(self, section, "window_seconds", ">=", 4 * self.bucket_seconds, "4 x bucket_seconds")
        ordered(self, section, "min_window_seconds", "<=", self.window_seconds, "window_seconds")
        ordered(self, section, "warning_hours", ">=", self.critical_hours, "critical_hours")
        ordered(self, section, "fast_min_seconds", "<=", self.fast_window_seconds, "fast_window_seconds")


def plateau_below(older: float, recent: float, span: float, headroom: float) -> bool:
    """A saturating fit against a linear one: growth whose rate fell from ``older`` (the first half of
    ``span``) to ``recent`` (the second) is an exponential approach with time constant
    tau = (span / 2) / ln(older / recent); what it has left to grow is recent x tau. True when that
    stays below ``headroom``: a fill that levels off in time. A linear leak (recent ~ older) has
    tau -> infinity. Halves of a noisy rise estimate tau within ~15%: a fill leaving a tenth of the
    headroom free at its plateau must not page, so the test is against PLATEAU_MARGIN x the headroom."""
    if recent >= older:
        return False
    tau = 0.5 * span / math.log(older / recent)
    return recent * tau < PLATEAU_MARGIN * headroom


@dataclass(slots=True)
class Open:
    """An open alert of one series: what opened it and how bad it was then."""

    growth: Growth
    kind: str  # "fast" or "steady"
    severity: str
    since: float = -math.inf  # where a fast rise began
    next_check: float = -math.inf  # an open fast alert is re-judged every FAST_RECHECK seconds, not every bucket


class Series:
    """One watched series: fine and minute minima, sawtooth drops, the open alert. Bounded."""

    __slots__ = ("fine", "low", "buckets", "drops", "fine_drops", "first_time", "open", "fine_width", "settings",
                 "recent")

    def __init__(self, s: HostMemoryLeakSettings, t: float) -> None:
        self.settings = s  # the settings it was built for (a reload assigns a new object)
        self.fine_width = min(s.fast_bucket_seconds, s.bucket_seconds)
        self.fine = FineBuckets(self.fine_width, math.ceil(s.fast_window_seconds / self.fine_width) + 2)
        self.low = SlidingMin(s.fast_window_seconds)
        size = math.ceil(2 * s.window_seconds / s.bucket_seconds) + 2  # window + longest floor span
        self.buckets = MinBuckets(s.bucket_seconds, size)
        self.drops = DropWatch()
        self.fine_drops = DropWatch()
        self.first_time = t
        self.open: Open | None = None
        self.recent: deque[tuple[float, float]] = deque(maxlen=RECENT_SAMPLES)  # raw samples: the short check

    @property
    def last(self) -> float:
        """The newest value (0.0 before any): the newest of ``recent``, which skips only a repeat of it."""
        return self.recent[-1][1] if self.recent else 0.0

    @property
    def growth(self) -> Growth | None:
        return None if self.open is None else self.open.growth

    def matches(self, s: HostMemoryLeakSettings) -> bool:
        """Still usable under ``s`` (after a reload): the same bucket widths and fast window."""
        if s is self.settings:
            return True
        if (self.buckets.width == s.bucket_seconds and self.low.span == s.fast_window_seconds
                and self.fine_width == min(s.fast_bucket_seconds, s.bucket_seconds)):
            self.settings = s
            return True
        return False

    # -- feeding ---------------------------------------------------------------
    def add(self, t: float, v: float, s: HostMemoryLeakSettings) -> int:
        """Fold a sample in: 0, or FINE when a fine bucket closed, | MINUTE when a minute one did, | RISE when
        the sample is ``fast_min_growth_mb`` above the lowest fine minimum of the window (the short and the
        fast check need that much: without it and with no alert open, a fine bucket's close has nothing to
        judge).

        The one fold of every series (a rank's, a machine's, a group's). Shaped for the hot path (every
        sample of every rank, twice): FineBuckets.add, SlidingMin.add and MinBuckets.add have their common
        cases inline, each bucket's index is compared as the float ``t // width`` against the int (exact,
        and no ``int()`` call), and the sawtooth watch is asked only when a fine minimum can change it."""
        recent = self.recent
        if not recent or recent[-1][1] != v:  # records between two probe readings repeat the last one
            recent.append((t, v))
        fine = self.fine
        q = t // fine.width
        if q == fine.index:  # the common case: same fine bucket
            if v < fine.low:
                fine.low, fine.low_time = v, t
            return 0
        idx = int(q)
        if fine.index is None or idx < fine.index:  # the first sample, or a late one: folded into the open bucket
            fine.add(t, v)
            return 0
        ct, cv = fine.low_time, fine.low
        fine.ring.append(ct, cv)
        fine.index, fine.low, fine.low_time = idx, v, t
        lows = self.low.window  # self.low.add(ct, cv)
        while lows and lows[-1][1] >= cv:
            lows.pop()
        lows.append((ct, cv))
        while lows[0][0] < ct - self.low.span:
            lows.popleft()
        # the open fine bucket holds only this sample (its low is v): the window's lowest is lows[0] or v
        got = FINE | RISE if v - lows[0][1] >= s.fast_min_growth_mb * MB else FINE
        drops = self.fine_drops
        trough = drops.trough
        # a fine minimum within what the sawtooth watch has seen, and no drop: it changes nothing there
        if trough is None or cv < trough or cv > drops.high or drops.high - cv >= s.sawtooth_drop_mb * MB:
            min_drop = s.sawtooth_drop_mb * MB
            if trough is not None and drops.high - cv >= min_drop:  # noise only when it may matter
                min_drop = max(min_drop, NOISE_DROP * self.fine_noise())
            drops.add(ct, cv, min_drop)
        buckets = self.buckets
        if buckets.index is not None and ct // buckets.width <= buckets.index:  # the same minute (exact, as above)
            if cv < buckets.low:
                buckets.low = cv
            return got
        minute = buckets.add(ct, cv)
        if not minute:
            return got
        bucket_time, low = self.buckets.ring.last()
        if bucket_time >= self.first_time + s.warmup_seconds:  # warmup growth is no sawtooth
            drops = self.drops
            min_drop = s.sawtooth_drop_mb * MB
            if drops.trough is not None and drops.high - low >= min_drop:  # noise only when it may matter
                min_drop = max(min_drop, NOISE_DROP * self.noise())
            drops.add(bucket_time, low, min_drop)
        return got | MINUTE

    def noise(self) -> float:
        """Robust standard deviation of the recent minute minima around their trend."""
        return jitter(self.buckets.ring.tail(JITTER_BUCKETS))

    def fine_noise(self) -> float:
        """Robust standard deviation of the newest fine minima, from their second differences: a
        fast rise bends (a start-up saturating), and first differences would count the bend as noise."""
        v = self.fine.ring.tail(12)
        if len(v) < 4:
            return 0.0
        d2 = [v[i + 2] - 2 * v[i + 1] + v[i] for i in range(len(v) - 2)]
        return 1.4826 * median(abs(d) for d in d2) / math.sqrt(6)

    # -- the fast check --------------------------------------------------------
    def fast_candidate(self, t: float, v: float, headroom: float, s: HostMemoryLeakSettings) -> bool:
        """O(1) pre-test: could the rise since the window's lowest point be a fast leak?"""
        t0, v0 = self.low.window[0] if self.low.window else (t, v)
        span, rise = t - t0, v - v0
        if span < s.fast_min_seconds or rise < s.fast_min_growth_mb * MB:
            return False
        # lenient (x 1.5): one noisy sample must not hide a leak from the full check
        return headroom * span / rise <= 1.5 * max(s.fast_horizon_seconds, s.fast_lead * span)

    def fast_growth(self, t: float, v: float, headroom: float, s: HostMemoryLeakSettings) -> Growth | None:
        """A sustained rise since the window's lowest point that exhausts ``headroom`` soon, or None.

        Sustained: it lasted ``fast_min_seconds``, rose ``fast_min_growth_mb`` and 6 sigma of the
        fine minima's noise, and its recent half rose at least ``fast_balance`` x its older half (up
        to noise): a start-up that saturates bends within its first minute, a single allocation is
        all in one half. Soon: time left <= ``fast_horizon_seconds``, or <= ``fast_lead`` x how
        long it has been rising (so the evidence needed grows with the time left). Longer than the
        longest sawtooth tooth seen on the fine minima, if any.
        """
        if not self.low.window:
            return None
        t0, v0 = self.low.window[0]
        pts = self.fine.ring.items(t0)
        if not pts or pts[-1][0] < t:
            pts.append((t, v))
        # the rise starts where memory was last at its low: within a tenth of the rise, or noise
        near = v0 + max(0.1 * (v - v0), 3 * self.fine_noise())
        first = max(i for i, p in enumerate(pts) if p[1] <= near)
        pts = pts[first:]
        t0, v0 = pts[0]
        span = t - t0
        period = min(self.fine_drops.period(t, forget_after=s.fast_window_seconds), s.fast_window_seconds / 2)
        if span < max(s.fast_min_seconds, 1.25 * period) or len(pts) < 4:
            return None
        rise = v - v0
        if rise < max(s.fast_min_growth_mb * MB, NOISE_RISE * self.noise()):
            return None
        t_mid = min(pts[1:-1], key=lambda p: abs(p[0] - (t0 + span / 2)))[0]
        early = [p for p in pts if p[0] <= t_mid]  # the halves share the middle point
        late = [p for p in pts if p[0] >= t_mid]
        older = theil_sen([p[0] for p in early], [p[1] for p in early], FAST_FIT_POINTS)
        rate = theil_sen([p[0] for p in late], [p[1] for p in late], FAST_FIT_POINTS)
        # the recent half rises like the older one; the forecast takes the recent rate (a bend lowers it)
        if older <= 0 or rate <= 0 or rate < s.fast_balance * older:
            return None
        left = max(0.0, headroom) / rate
        if left > max(s.fast_horizon_seconds, s.fast_lead * span):
            return None
        # a fill: it slows down and levels off before the headroom is gone. Within the horizon only when
        # the bend is clear (a noisy leak's halves differ by up to ~20%)
        if (left > s.fast_horizon_seconds or rate < FILL_BEND * older) and plateau_below(older, rate, span, headroom):
            return None
        return Growth(rate, rise, span, v)

    def short_growth(self, t: float, v: float, headroom: float, s: HostMemoryLeakSettings) -> Growth | None:
        """A rise of at least ``short_min_seconds`` over the raw samples of the last ``fast_min_seconds``
        whose time left is within ``fast_lead`` x its age: a leak that kills within a minute or so is
        reported before the fast check has its 40 s of evidence. The same balance and noise rules."""
        if self.open is not None or len(self.recent) < 5 or not self.low.window:
            return None
        # O(1) pre-test: a rise R over >= short_min_seconds fires only if the headroom goes within
        # fast_lead x fast_min_seconds at about R / short_min_seconds (x2 for a rise that speeds up)
        rise = v - min(self.low.window[0][1], self.fine.low)
        if rise < s.fast_min_growth_mb * MB or headroom * s.short_min_seconds > (
                2 * s.fast_lead * s.fast_min_seconds * rise):
            return None
        pts = [p for p in self.recent if p[0] >= t - s.fast_min_seconds]
        if len(pts) < 5:
            return None
        # the noise of the minute minima: the fine minima's own would count the bend where the leak began
        noise = self.noise()
        v0 = min(p[1] for p in pts)
        near = v0 + max(0.1 * (v - v0), 3 * noise)
        first = max(i for i, p in enumerate(pts) if p[1] <= near)
        pts = pts[first:]
        t0, v0 = pts[0]
        span, rise = t - t0, v - v0
        if span < s.short_min_seconds or len(pts) < 5 or rise < max(s.fast_min_growth_mb * MB, NOISE_RISE * noise):
            return None
        mid = len(pts) // 2
        older = theil_sen([p[0] for p in pts[:mid + 1]], [p[1] for p in pts[:mid + 1]], FAST_FIT_POINTS)
        rate = theil_sen([p[0] for p in pts[mid:]], [p[1] for p in pts[mid:]], FAST_FIT_POINTS)
        if older <= 0 or rate <= 0 or rate < s.fast_balance * older:
            return None
        if max(0.0, headroom) / rate > s.fast_lead * span:
            return None
        return Growth(rate, rise, span, v)

    def opens_fast(self, t: float, v: float, headroom: float, s: HostMemoryLeakSettings, short: bool = True) -> bool:
        """Open a fast alert (critical) when the short check (unless ``short`` is False: an alert is already
        open) or the fast check sees a rise that exhausts ``headroom`` soon; True when it opened one."""
        growth = self.short_growth(t, v, headroom, s) if short else None
        if growth is None and self.fast_candidate(t, v, headroom, s):
            growth = self.fast_growth(t, v, headroom, s)
        if growth is None:
            return False
        self.open = Open(growth, "fast", "critical", t - growth.lookback)
        return True

    def rate_since(self, since: float) -> float:
        """Theil-Sen rate (bytes/s) since ``since``: of the raw samples where they reach back that far,
        else of the fine minima (0 with too few points)."""
        if self.recent and self.recent[0][0] <= since:
            pts = [p for p in self.recent if p[0] >= since]
        else:
            pts = self.fine.ring.items(since)
        return theil_sen([p[0] for p in pts], [p[1] for p in pts], FAST_FIT_POINTS) if len(pts) >= 3 else 0.0

    def fast_still_rising(self, t: float, headroom: float, s: HostMemoryLeakSettings) -> Growth | None:
        """While a fast alert is open: the rise over the last half fast window, if it still
        exhausts ``headroom`` within twice ``critical_hours``."""
        since = t - s.fast_window_seconds / 2 if self.open is None else max(
            self.open.since, t - s.fast_window_seconds / 2)
        pts = self.fine.ring.items(since)
        if len(pts) < 4:
            return self.growth  # too little to tell: keep what is open
        rate = theil_sen([p[0] for p in pts], [p[1] for p in pts], FAST_FIT_POINTS)
        if rate <= 0 or max(0.0, headroom) / rate > 2 * s.critical_hours * HOUR:
            return None
        return Growth(rate, pts[-1][1] - pts[0][1], pts[-1][0] - pts[0][0], pts[-1][1])

    # -- the seasonal check: a leak under a sawtooth ------------------------------
    def seasonal(self, s: HostMemoryLeakSettings, now: float, lenient: bool = False) -> Growth | None:
        """Under a sawtooth of period P (DataLoader epochs), memory now against memory one period ago at
        the same point of the tooth: a healthy sawtooth repeats itself (differences ~0), a leak adds its
        rate x P to every one. Fires when, over the last SEASONAL_POINTS minutes (all after warmup, so
        the lagged point is too), at least 80% of the differences exceed ``min_growth_mb`` and 6 sigma of
        the noise and the newer ones are at least SEASONAL_BALANCE x the older ones (a cache filling
        during the first epochs makes shrinking differences). A leak present from the start is reported
        about P + warmup + 4 min in (29 min for 20-minute epochs). ``lenient`` (while open, and for the peers
        of a rank that fired): 3 points, and the median difference above half the threshold."""
        period = self.fine_drops.period(now, forget_after=s.window_seconds)
        width = s.bucket_seconds
        if period < 2 * width or period > s.window_seconds:
            return None
        pts = self.buckets.ring.items(now - period - (SEASONAL_POINTS + 2) * width)
        start = self.first_time + s.warmup_seconds
        recent = [p for p in pts if p[0] >= now - (SEASONAL_POINTS + 0.5) * width and p[0] - period >= start]
        if len(recent) < (3 if lenient else SEASONAL_POINTS):
            return None
        diffs = []
        j = 0
        for t, v in recent:
            target = t - period
            while j + 1 < len(pts) and abs(pts[j + 1][0] - target) <= abs(pts[j][0] - target):
                j += 1
            if abs(pts[j][0] - target) > width:
                return None
            diffs.append(v - pts[j][1])
        threshold = max(s.min_growth_mb * MB, NOISE_RISE * self.noise())
        mid = median(diffs)
        growth = Growth(mid / period, mid, period, recent[-1][1])
        if lenient:
            return growth if mid >= 0.5 * threshold else None
        if sum(d >= threshold for d in diffs) < 0.8 * len(diffs):
            return None
        k = len(diffs) // 2
        if sum(diffs[-k:]) < SEASONAL_BALANCE * sum(diffs[:k]):
            return None
        return growth

    # -- the steady check ------------------------------------------------------
    def floor_span(self, s: HostMemoryLeakSettings, now: float) -> tuple[float, float]:
        """(span of the floor, time of the oldest minute it is taken over)."""
        period = self.drops.period(now, forget_after=s.window_seconds)
        span = min(max(s.floor_seconds, 1.25 * period), s.window_seconds)
        return span, max(self.first_time + s.warmup_seconds, now - s.window_seconds - span)

    def floors(self, s: HostMemoryLeakSettings, now: float,
               span_since: tuple[float, float] | None = None) -> list[tuple[float, float]]:
        span, since = span_since or self.floor_span(s, now)
        floors = rolling_floor(self.buckets.ring.items(since), span)
        return [p for p in floors if p[0] >= max(since + span, now - s.window_seconds)]

    def steady(self, s: HostMemoryLeakSettings, now: float) -> Growth | None:
        """The steady growth (if any) over the floors; for an open steady alert, None once flat."""
        span_since = self.floor_span(s, now)
        if self.open is None or self.open.kind != "steady":
            # cheap bound first (most minutes of most runs stop here): every lookback needs the newest floor
            # min_growth_mb / 2 above an older one; the newest floor is at most the newest minute, an older
            # one at least the lowest minute since the floors begin
            ring = self.buckets.ring
            if ring.count and ring.last()[1] - ring.min_since(span_since[1]) < 0.5 * (s.min_growth_mb * MB):
                return None
        floors = self.floors(s, now, span_since)
        min_rate = s.min_rate_mb_per_hour * MB / HOUR
        noise = self.noise()
        if self.open is not None and self.open.kind == "steady":  # stays open until the trend flattens
            pts = [p for p in floors if p[0] >= now - s.window_seconds / 2]
            if len(pts) < 3:  # a sawtooth just showed itself: the floor starts over
                return None
            rate = theil_sen([p[0] for p in pts], [p[1] for p in pts])
            if rate < 0.5 * min_rate and theil_sen([p[0] for p in floors],
                                                   [p[1] for p in floors]) < min_rate:
                return None  # flat over the last half window, and slow over the whole
            found = self._steady(s, floors, noise)
            old = self.open.growth
            return found or Growth(rate, old.rise, old.lookback, pts[-1][1])
        return self._steady(s, floors, noise)

    @staticmethod
    def _steady(s: HostMemoryLeakSettings, floors: list[tuple[float, float]],
                noise: float) -> Growth | None:
        if not floors or floors[-1][0] - floors[0][0] < s.min_window_seconds:
            return None
        lookbacks = [s.min_window_seconds]
        while lookbacks[-1] < s.window_seconds:
            lookbacks.append(min(2 * lookbacks[-1], s.window_seconds))
        return steady_growth(floors, lookbacks, min_rate=s.min_rate_mb_per_hour * MB / HOUR,
                             min_rise=max(s.min_growth_mb * MB, NOISE_RISE * noise),
                             balance=s.balance, short_balance=s.short_balance,
                             short_lookback=SHORT_LOOKBACK)
