"""loss_spike and grad_explosion: a rank's value jumps far above its own recent level.

Early warnings before divergence, from robust statistics of each rank's recent
history rather than fixed thresholds. Per rank, the last ``window`` finite
values are kept in log space (log-loss, log-grad-norm: an LR drop that
divides the loss by 10 is a shift, not a change of noise), and so are the
absolute step-to-step changes of those values, each with a sorted copy, so the
medians cost O(1) to read and an O(window) memmove to maintain. (The copies are
kept lazily: the changes' median is read only for a value already far above the
level, and an ordinary value is told from a lower bound on the level and waits in a
list until a value that is not ordinary; see ``_SpikeDetector.update``.)

- level: the median of the window;
- noise: the median absolute step-to-step change / 0.954 (the standard
  deviation for Gaussian noise). Unlike the spread of the window, it does not
  grow with a trend: a loss that climbs by orders of magnitude, steadily, as a
  run diverges, stands out against its step-to-step noise, while the spread of
  the window would grow with it.

A sample is *high* when it is at least ``z_threshold`` noise deviations above
the level AND at least ``min_ratio`` times the level (the ratio guards smooth
curves whose noise is tiny, and healthy trends: a grad norm rising 30x over
400 steps is only 1.5x above the median of its last 100). The alert fires
after ``confirm_samples`` high samples in a row, once the rank has
``min_history`` values. Losses going down (warmup, LR drops) never count:
only upward jumps do. Heavy-tailed noise needs two 10-deviation outliers in a
row.

Resolution is judged against the level and noise frozen when the alert fired:
``resolve_samples`` samples in a row within ``z_resolve`` deviations (or
within sqrt(min_ratio) times the level) resolve it ("back to ..."). If the
value stays high for a whole window and is no longer high against that window
(it settled, it is not still climbing), the alert resolves as a new level. A ``start``
record of the rank (a restart) clears its history and resolves its open alert.

Non-finite values are left to nan_divergence. Losses <= 0 switch that rank to
linear values (no log, no ratio guard); grad norms <= 0 are skipped.

Two more ways to be high (docs/divergence.md): a *soft* spike, ``soft_ratio``
(below ``min_ratio``) times the level and ``soft_z`` noise deviations above it (a
smooth LLM loss jumping 1.5x); and, before ``min_history`` values exist, *early*
growth: the last ``EARLY_CONFIRM`` values in a row all ``early_growth`` times the median of the rank's first
``EARLY_BASE`` values since its start. A median and a run of values, not the first value and one sample: a
per-rank loss on a tiny batch is noisy from its first step (the reference trainer's moves 10-40x between
neighbouring steps on healthy runs), and one low first value would make every later one look grown.

Judged per rank, told per run: both detectors share the run's one spike incident
(helpers/divergence_story.py), a run-level alert (``rank`` null) that the first signal
fires and every other rank and signal refreshes; it resolves when every rank of
both signals is back, folds into nan_divergence at the NaN, and joins
lr_scaling's alert when that one already says the LR is too high.
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections import deque
from dataclasses import dataclass
from math import isfinite, log
from operator import attrgetter
from statistics import median
from typing import Any, ClassVar, cast

from ..config.rules import above, flag, ordered, whole
from ..events import Event, Severity, firing, resolved
from ..record import Record
from ..state import RunState
from .base import Detector
from .helpers.divergence_story import Label, Part, story_of
from .helpers.steps import step_of as _step_of

LR_ALERT = "lr_scaling"  # the alert a rise joins when it says the LR is too high (helpers/divergence_story.py)
INF = math.inf
MAD_DIFF_TO_SIGMA = 0.6745 * math.sqrt(2.0)  # median |x_t - x_t-1| of Gaussian noise, in sigmas


class RobustWindow:
    """The last ``size`` values, with a sorted copy for the median."""

    __slots__ = ("values", "ordered", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.values: deque[float] = deque()
        self.ordered: list[float] = []

    def __len__(self) -> int:
        return len(self.values)

    def push(self, x: float) -> None:
        values, ordered = self.values, self.ordered
        if len(values) >= self.size:
            del ordered[bisect_left(ordered, values.popleft())]
        values.append(x)
        insort(ordered, x)

    def resize(self, size: int) -> None:
        kept = list(self.values)[-size:]
        self.size = size
        self.clear()
        for x in kept:
            self.push(x)

    def clear(self) -> None:
        self.values.clear()
        self.ordered.clear()

    def median(self) -> float:
        s = self.ordered
        n = len(s)
        m = n // 2
        return s[m] if n % 2 else 0.5 * (s[m - 1] + s[m])


class LazyWindow(RobustWindow):
    """A RobustWindow whose sorted copy catches up only when a median is read.

    For a window read rarely (the step-to-step changes: their median is needed only when a value
    is already far above the level): a push is O(1); the values it added and dropped wait until
    the next ``median()``, which inserts and deletes them, or re-sorts the window once more than a
    window's worth has changed (then nothing waits: memory stays bounded). Same medians as
    RobustWindow, always.
    """

    __slots__ = ("added", "dropped", "resort")

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.added: list[float] = []
        self.dropped: list[float] = []
        self.resort = False  # ordered is stale: rebuild it from values

    def push(self, x: float) -> None:
        values = self.values
        if len(values) >= self.size:
            old = values.popleft()
            if not self.resort:
                self.dropped.append(old)
        values.append(x)
        if not self.resort:
            added = self.added
            added.append(x)
            if len(added) > self.size:
                self.resort = True
                added.clear()
                self.dropped.clear()

    def clear(self) -> None:
        super().clear()
        self.added.clear()
        self.dropped.clear()
        self.resort = False

    def median(self) -> float:
        if self.resort:
            self.ordered = sorted(self.values)
            self.resort = False
        elif self.added:
            ordered = self.ordered
            for x in self.added:  # first the adds: a dropped value may be one of them
                insort(ordered, x)
            for x in self.dropped:
                del ordered[bisect_left(ordered, x)]
            self.added.clear()
            self.dropped.clear()
        return super().median()


CATCH_UP_INSERTS = 8  # a lagging sorted copy takes this many values by insertion at most, else is sorted again
EARLY_BASE = 3  # early growth is judged against the median of a rank's first values since its start...
EARLY_CONFIRM = 3  # ...by this many values in a row (at least confirm_samples)
EARLY_JUMP = 10.0  # a jump inside those first values: this many times early_growth above the ranks' first values


@dataclass(kw_only=True, slots=True)
class SpikeSettings:
    enabled: bool = True
    window: int = 100  # samples per rank
    min_history: int = 20  # samples before judging
    z_threshold: float = 10.0  # robust deviations above the median
    min_ratio: float = 2.0  # and at least this many times the median
    confirm_samples: int = 2  # high samples in a row to fire
    z_resolve: float = 3.0
    resolve_samples: int = 3  # calm samples in a row to resolve
    # a smooth curve's own noise: a jump of soft_ratio (below min_ratio) is a soft spike when it is soft_z
    # noise deviations above the median (only a curve with little step-to-step noise gets there)
    soft_ratio: float = 1.4
    soft_z: float = 30.0
    # before min_history values exist (the first samples after a start or a resume): a value this many
    # times the first one, confirm_samples times in a row, fires (absolute growth)
    early_growth: float = 10.0

    def __post_init__(self) -> None:
        self._check("loss_spike")

    def _check(self, name: str) -> None:
        flag(self, name, "enabled")
        whole(self, name, "window", "min_history", "confirm_samples", "resolve_samples", minimum=1)
        if self.min_history < 4 or self.min_history > self.window:
            raise ValueError(f"{name}.min_history: must be 4..window ({self.window}), "
                             f"got {self.min_history!r}")
        above(self, name, 0.0, "z_threshold", "z_resolve")
        above(self, name, 1.0, "min_ratio")
        ordered(self, name, "z_resolve", "<=", self.z_threshold, "z_threshold", spec="g")
        above(self, name, 1.0, "soft_ratio", "early_growth")
        ordered(self, name, "soft_ratio", "<=", self.min_ratio, "min_ratio", spec="g")
        ordered(self, name, "soft_z", ">=", self.z_threshold, "z_threshold", spec="g")


@dataclass(kw_only=True, slots=True)
class GradExplosionSettings(SpikeSettings):
    min_ratio: float = 5.0  # grad norms are noisier than losses: single 2-4x bumps are common
    soft_ratio: float = 5.0  # no soft tier: a grad norm moving 2-4x is routine
    # zero-initialized adapters (LoRA's B) and warmups make grad norms grow 10x+ in the first steps, healthily
    early_growth: float = 100.0

    def __post_init__(self) -> None:
        self._check("grad_explosion")


class _Rank:
    __slots__ = ("steady", "soft", "low", "added", "window", "values", "ordered", "changes", "waiting", "before",
                 "prev", "linear", "high", "onset_step", "firing", "base_median", "base_sigma", "calm", "fired_for",
                 "early", "first_step", "how", "early_from")

    def __init__(self, size: int) -> None:
        # the settings under which its next value may take the common way (``_SpikeDetector.update``): at least
        # min_history values in log space, early values all in, no alert open, no high value in a row; None
        # until then
        self.steady: SpikeSettings | None = None
        self.soft = 0.0  # log(soft_ratio) of those settings
        self.low = 0  # (n - 1) // 2 for the n values of the window when it was last caught up
        # while steady, the values taken the common way wait here (log space), in order: the window, its sorted
        # copy and the changes take them at the next value that is not common (``catch_up``)
        self.added: list[float] = []
        self.window = RobustWindow(size)  # values (log space)
        self.values, self.ordered = self.window.values, self.window.ordered  # (the same objects: read per value)
        self.changes = LazyWindow(size)  # |value - previous value|; its median is read rarely (``sigma_window``)
        self.waiting = 0  # changes not pushed to it yet: those between the window's latest values
        self.before: float | None = None  # the value the window dropped last (the one before its oldest)
        self.prev: float | None = None
        self.linear = False  # True once a value <= 0 was seen (losses only)
        self.high = 0  # high samples in a row
        self.onset_step = 0
        self.firing = False
        self.base_median = 0.0  # frozen at firing
        self.base_sigma = 0.0
        self.calm = 0
        self.fired_for = 0  # samples since firing
        self.early: list[float] = []  # the first EARLY_BASE values since the start (log space), for early growth
        self.early_from = ""  # what the early baseline was, in words
        self.first_step = 0
        self.how = ""  # how the firing was judged: "robust", "soft" or "early"

    def sigma_window(self) -> LazyWindow:
        """The changes' window, caught up: a change is pushed only when the median is read (a value far above
        the level), from the values it is the difference of (the window's latest, and the one before them)."""
        n = self.waiting
        if n:
            self.waiting = 0
            changes = self.changes
            n = min(n, changes.size)  # older ones would leave the window anyway
            values = self.window.values
            seq = list(values)[-(n + 1):]
            if len(seq) <= n:
                assert self.before is not None
                seq.insert(0, self.before)
            push = changes.push
            for a, b in zip(seq, seq[1:]):
                push(abs(b - a))
        return self.changes

    def clear(self) -> None:
        self.window.clear()
        self.changes.clear()
        self.prev = None
        self.waiting = 0
        self.before = None
        self.added.clear()

    def catch_up(self) -> None:
        """The values taken the common way join the window, as ``RobustWindow.push`` one by one would have added
        them (and the changes wait for them as ``update`` would have counted them); the sorted copy takes them by
        insertion when few, else is sorted again."""
        added, values, ordered = self.added, self.values, self.ordered
        size = self.window.size
        if len(added) > CATCH_UP_INSERTS:  # the same, by slices
            seq = [*values, *added]
            if len(seq) > size:
                self.before = seq[-size - 1]
                del seq[:-size]
            values.clear()
            values.extend(seq)
            seq.sort()
            ordered[:] = seq  # in place: the window's own list
        else:
            for x in added:
                if len(values) >= size:
                    self.before = old = values.popleft()
                    del ordered[bisect_left(ordered, old)]
                values.append(x)
                insort(ordered, x)
        self.waiting += len(added)  # each follows a value (the window held min_history of them): one change each
        self.prev = added[-1]
        added.clear()


class _SpikeDetector(Detector[SpikeSettings]):
    record_types = ("start", "sample")  # LossSpike and GradExplosion
    field: ClassVar[str] = ""
    label: ClassVar[Label] = "loss"
    linear_below_zero: ClassVar[bool] = False
    # the record's value of ``field`` (cheaper than getattr); a class attribute, so no snapshot holds it
    # (checkpoint.py unpickles only the project's own state)
    value_of: ClassVar[attrgetter[float | None]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.value_of = attrgetter(cls.field)

    def __init__(self, settings: SpikeSettings, run: RunState) -> None:
        super().__init__(settings, run)
        self.ranks: dict[int, _Rank] = {}
        self.firsts: dict[int, float] = {}  # each rank's first value since its start (log space): early jumps
        self.firsts_median: float | None = None  # their median, until they change (read per early value)
        self.story = story_of(run)  # the run's one spike incident, shared with the other spike detector

    def update(self, record: Record) -> list[Event]:
        kind = record.type
        if kind != "sample":
            return self._restart(record) if kind == "start" else []
        s = self.settings
        if not s.enabled:
            return []
        story = self.story
        if record is not story.noted:  # its LR, once per record for the divergence detectors together
            story.note_sample(record)
        if story.diverged:  # the run went NaN: nan_divergence tells the rest, until a restart
            if self.ranks:
                self.ranks.clear()
                self.firsts.clear()
                self.firsts_median = None
            return []
        value = self.value_of(record)
        if value is None:
            return []
        try:  # (cheaper than .get for every value)
            st: _Rank | None = self.ranks[record.rank]
        except KeyError:
            st = None
        if value > 0.0 and st is not None and st.steady is s:
            # the common way, written out: a value that is not even soft_ratio above the lowest the level can be
            # is not high (as below, where every case is handled), and only joins the window (in ``added``, until
            # ``catch_up``). The window's sorted copy S held n values when last caught up; j values came since and
            # at most j left. A value leaving moves no order statistic down, each one coming moves them down one
            # place at most, so the window's k-th smallest now is at least S[k - j] for k = (n - 1) // 2, and its
            # median (the k-th or above: it holds n values or more; the mean of two middle ones is not below the
            # lower in floats either) at least that
            x = log(value)  # (inf for +inf: never below a bound)
            added = st.added
            i = st.low - len(added)
            if i >= 0 and x - st.ordered[i] < st.soft:
                added.append(x)
                return []
        if not isfinite(value):
            return []
        if st is not None and st.added:
            st.catch_up()
        if st is None:
            st = self.ranks[record.rank] = _Rank(s.window)
        elif st.window.size != s.window:  # config reload changed the window
            st.sigma_window().resize(s.window)
            st.window.resize(s.window)
        if value <= 0 and not st.linear:
            if not self.linear_below_zero:
                return []
            st.linear = True
            st.clear()
        x = value if st.linear else log(value)
        ordered = st.ordered  # the window sorted (RobustWindow.median, read here at every value)
        out: list[Event] = []
        if st.firing:
            st.fired_for += 1
            out = self._judge_firing(record, st, x, value)
        elif len(ordered) >= s.min_history:
            n = len(ordered)
            m = n // 2
            med = ordered[m] if n % 2 else 0.5 * (ordered[m - 1] + ordered[m])
            jump = x - med
            # the changes' median (sigma) is read only for a value already soft_ratio above the level
            if jump > 0 and (st.linear or jump >= log(s.soft_ratio)):
                sigma = st.sigma_window().median() / MAD_DIFF_TO_SIGMA
                hard = jump >= s.z_threshold * sigma and (st.linear or jump >= log(s.min_ratio))
                if hard or (not st.linear and jump >= s.soft_z * sigma):
                    st.high += 1
                    if st.high == 1:
                        st.onset_step = record.step or 0
                    if st.high >= s.confirm_samples:
                        out = self._fire(record, st, x, value, med, sigma, "robust" if hard else "soft")
                else:
                    st.high = 0
            else:
                st.high = 0
        elif st.early and not st.linear:  # no history yet: absolute growth since the start
            base = self._early_base(st, x)
            if base is not None:
                st.high += 1
                if st.high == 1:
                    st.onset_step = record.step or 0
                if st.high >= max(s.confirm_samples, EARLY_CONFIRM):
                    out = self._fire(record, st, x, value, base, 0.0, "early")
            else:
                st.high = 0
        if len(st.early) < EARLY_BASE and not st.linear:
            if not st.early:
                st.first_step = record.step or 0
                self.firsts[record.rank] = x
                self.firsts_median = None
            st.early.append(x)
        # st.window.push(x), written out
        values = st.values
        if len(values) >= st.window.size:
            st.before = old = values.popleft()
            del ordered[bisect_left(ordered, old)]
        values.append(x)
        insort(ordered, x)
        if st.prev is not None:
            st.waiting += 1  # |x - prev| joins the changes when they are read
        st.prev = x
        self._steady(st)
        return out

    def _steady(self, st: _Rank) -> None:
        """Whether the rank's next value may take the common way (``update``), and its bounds there."""
        s = self.settings
        values = st.values
        if (st.linear or st.firing or st.high or len(st.early) < EARLY_BASE or len(values) < s.min_history
                or st.window.size != s.window):
            st.steady = None
            return
        st.steady = s
        st.soft = log(s.soft_ratio)
        st.low = (len(values) - 1) // 2

    def _early_base(self, st: _Rank, x: float) -> float | None:
        """The baseline ``x`` grew ``early_growth`` times above, or None: the median of the rank's first
        EARLY_BASE values; or, for a jump inside those first values (AdamW at a huge LR: 27 -> 7,480 at its
        second step, and it stays there), ``EARLY_JUMP`` times more above the median of the ranks' first
        values (one rank's lucky first batch is not the run's start)."""
        grow = log(self.settings.early_growth)
        if len(st.early) == EARLY_BASE:
            base = sorted(st.early)[EARLY_BASE // 2]
            if x - base >= grow:
                st.early_from = f"the median of its first {EARLY_BASE} samples, from step {st.first_step}"
                return base
        firsts = self.firsts.values()
        if self.firsts_median is None:
            self.firsts_median = median(firsts)
        base = self.firsts_median
        if x - base >= grow + log(EARLY_JUMP):
            who = "its first sample" if len(firsts) == 1 else f"the median of {len(firsts)} ranks' first samples"
            st.early_from = f"{who}, {EARLY_JUMP:g}x the usual bound: a jump"
            return base
        return None

    def _high(self, st: _Rank, jump: float, sigma: float) -> bool:
        s = self.settings
        return jump > 0 and jump >= s.z_threshold * sigma and (st.linear or jump >= math.log(s.min_ratio))

    def _fire(self, record: Record, st: _Rank, x: float, value: float, med: float,
              sigma: float, how: str) -> list[Event]:
        st.firing, st.high, st.calm, st.fired_for, st.how = True, 0, 0, 0, how
        st.base_median, st.base_sigma = med, sigma
        step = record.step or 0
        base = med if st.linear else math.exp(med)
        z = (x - med) / sigma if sigma > 0 else math.inf
        ratio = value / base if base > 0 else math.inf
        label, rank = self.label, record.rank
        if how == "early":
            text = (f"{label} grew {ratio:.3g}x within {step - st.first_step} steps of its start: "
                    f"{base:.4g} ({st.early_from}) -> "
                    f"{value:.4g} at step {step} on rank {rank}, high since step {st.onset_step} (no "
                    f"history yet: judged by absolute growth, {self.settings.early_growth:g}x or more)")
        elif how == "soft":
            text = (f"a soft {label} spike: {value:.4g} at step {step} on rank {rank}, {ratio:.3g}x its recent "
                    f"median {base:.4g}, small but {_z(z)} deviations above its smooth curve's own noise "
                    f"(since step {st.onset_step})")
        else:
            text = (f"{label} jumped to {value:.4g} at step {step} on rank {rank}, {ratio:.3g}x its recent "
                    f"median {base:.4g} ({_z(z)} robust deviations above, since step {st.onset_step})")
        story = self.story
        part = story.parts.get(label)
        if part is None or not part.ranks and part.recovered:  # new, or a recovered signal rising again
            part = story.parts[label] = Part(label, first_rank=rank, onset_step=st.onset_step, value=value,
                                             baseline=base, ratio=ratio, how=how, text=text)
        part.ranks.add(rank)
        part.seen.add(rank)
        return [self._tell(record.time, step, value=value, z=z)]

    def _tell(self, time: float, step: int, **data: Any) -> Event:
        """The run's spike incident as it stands: fired by the first signal, refreshed by the rest."""
        story = self.story
        parts = list(story.parts.values())
        if story.lr_change is not None and story.cause(before=min(p.onset_step for p in parts)):
            advice = (f"go back to the LR before the change ({story.lr_change.before:g}) or clip gradients "
                      "before it diverges")
        elif "grad norm" in story.parts:
            advice = "clip gradients (clip_grad_norm_) or lower the LR before it diverges"
        else:
            advice = "lower the LR or clip gradients before it diverges"
        calm = all(not p.ranks for p in parts)
        if calm:
            advice = "no action needed if it stays down"
        fields = {**story.fields(), **data}
        lr = story.lr_finding
        if lr is not None and story.holder in (None, LR_ALERT):  # the LR lr_scaling called too high: its cause
            story.holder = LR_ALERT
            lr_summary, severity, lr_fields = lr
            event = firing(LR_ALERT, None, step, time, f"{lr_summary}; since then {story.summary('')}",
                           cast(Severity, severity), **{**fields, **lr_fields})  # the LR's ratio stays its own
            event.refresh = True
            return event
        if story.holder is None:
            story.holder = self.name
            return firing(self.name, None, step, time, story.summary(advice), "warning", **fields)
        event = firing(story.holder, None, step, time, story.summary(advice), "warning", **fields)
        event.refresh = True
        return event

    def _judge_firing(self, record: Record, st: _Rank, x: float, value: float) -> list[Event]:
        s = self.settings
        jump = x - st.base_median
        near = s.z_resolve * st.base_sigma
        if not st.linear:
            near = max(near, 0.5 * math.log(s.min_ratio))  # within sqrt(min_ratio) of the baseline
        calm = jump < near
        st.calm = st.calm + 1 if calm else 0
        step = record.step or 0
        base = st.base_median if st.linear else math.exp(st.base_median)
        if st.calm >= s.resolve_samples:
            how = f"back to {value:.4g}"
        elif not calm and st.fired_for >= s.window and not self._high(
                st, x - st.window.median(), st.sigma_window().median() / MAD_DIFF_TO_SIGMA):
            how = f"settled at a new level {value:.4g} for {st.fired_for} samples"
        else:
            return []
        st.firing, st.calm, st.high = False, 0, 0
        return self._calm(record, f"{self.label} {how} at step {step} on rank {record.rank} "
                                  f"(pre-spike median {base:.4g})", value=value, baseline=base)

    def _calm(self, record: Record, text: str, **data: Any) -> list[Event]:
        """A rank of this signal came back: when it was the signal's last, the incident says so (it
        recovered); when every signal has, the run's spike incident resolves."""
        story = self.story
        part = story.parts.get(self.label)
        if part is None or record.rank not in part.ranks or story.holder is None:
            return []
        part.ranks.discard(record.rank)
        if part.ranks:
            return []
        part.recovered = text.replace(f" on rank {record.rank}", "" if len(part.seen) == 1 else " on every rank")
        step = record.step if record.step is not None else _step_of(record, self.run)
        if any(p.ranks for p in story.parts.values()):
            return [self._tell(record.time, step)]
        if story.holder == LR_ALERT:  # lr_scaling's alert held the rise: it says so, and stays (the LR is still off)
            told = self._tell(record.time, step)
            story.reset_spikes()
            return [told]
        holder = story.holder
        summary = "; ".join(p.recovered for p in story.parts.values())
        story.reset_spikes()
        return [resolved(holder, None, step, record.time, summary, resolved_by="recovered", **data)]

    def facts(self) -> dict[str, Any]:
        """The run's open spike incident, per-rank detail included (GET /v1/runs/{run}), from its holder."""
        story = self.story
        return story.fields() if story.holder == self.name and story.parts else {}

    def _restart(self, record: Record) -> list[Event]:
        st = self.ranks.pop(record.rank, None)
        if self.firsts.pop(record.rank, None) is not None:
            self.firsts_median = None
        if st is None or not st.firing:
            return []
        return self._calm(record, f"rank {record.rank} restarted; {self.label} history cleared")


def _z(z: float) -> str:
    return "inf" if math.isinf(z) else f"{z:.0f}"


class LossSpike(_SpikeDetector):
    name = "loss_spike"
    Settings = SpikeSettings
    field = "loss"
    label = "loss"
    linear_below_zero = True


class GradExplosion(_SpikeDetector):
    name = "grad_explosion"
    Settings = GradExplosionSettings
    field = "grad_norm"
    label = "grad norm"


__all__: list[Any] = ["LossSpike", "GradExplosion", "RobustWindow", "SpikeSettings",
                      "GradExplosionSettings"]
