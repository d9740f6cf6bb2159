"""nan_divergence: the loss or the grad norm became NaN/Inf, on any rank.

Every rank is checked; one incident, one page: the run has one open
nan_divergence alert (``rank`` null) that names the root, the rank(s) that went
non-finite first: the lowest non-finite step; on a tie, ranks whose own loss
is non-finite before ranks with only a non-finite grad norm (bad data on rank 5
makes its loss NaN; the other ranks get NaN only through the all-reduce of the
gradients, in the same step); ``first_rank`` is the lowest of them. Never the
arrival time: ranks a few microseconds apart must not make the server and
replay disagree. Every rank tied at that (step, own loss) is a root: ranks that
do not share gradients can each go NaN on their own.

The advice fits each rank. A rank whose own loss went non-finite is told so and
keeps the LR advice (restart from the last good checkpoint with a lower LR, and
check its batch); ranks that only received the NaN (a non-finite grad norm, their
own loss finite) are listed in ``received_ranks`` with "check rank K's batch".
Ranks send their own batches, so the first rank's record may arrive after the
alert went out: the alert is refreshed in place (same fingerprint, no second
page), and the run-level ``facts()`` (``GET /v1/runs/{run}``:
``findings.nan_divergence``) carry the same picture.

fp16 dynamic loss scaling (samples carry ``grad_scale``): an infinite grad norm
on a step the scaler skips is normal. The scaler shows the skip by lowering
``grad_scale``, in the same sample (logged after ``scaler.update()``) or in the
next one (logged before it); both are accepted, so a non-finite grad norm whose
scale did not drop is judged one sample later. It is divergence when the loss
itself is non-finite, or when the overflows keep coming while the scale
collapses: ``amp_max_consecutive_overflows`` drops in a row, the scale below
``amp_min_scale`` (gradients overflow fp16 even unscaled), or the scale
``amp_collapse_factor`` times below the highest scale at which a step succeeded
within the last ``amp_peak_window`` steps.

Divergence is terminal: the alert stays open until the run starts again. A
restart is judged per rank: a rank's own ``start`` after it had sent samples
(the ranks' initial starts arrive spread out, and a late one is no restart).
A restart resolves every open nan_divergence alert of the run and forgets every
rank (torchrun restarts all workers together, so the first restarted rank is
enough; a client that sends ``start`` from rank 0 only works too).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from ..config.rules import flag, whole
from ..events import Event, firing, resolved
from ..record import Record
from ..state import RunState
from .base import Detector
from .helpers.divergence_story import story_of
from .helpers.incident import hosts_of, ranks_phrase, where
from .helpers.steps import step_of as _step_of


@dataclass(kw_only=True, slots=True)
class NanDivergenceSettings:
    enabled: bool = True
    amp_max_consecutive_overflows: int = 10
    amp_min_scale: float = 1.0
    amp_collapse_factor: float = 1024.0
    amp_peak_window: int = 2000  # steps; GradScaler's default growth_interval

    def __post_init__(self) -> None:
        name = "nan_divergence"
        flag(self, name, "enabled")
        whole(self, name, "amp_max_consecutive_overflows", "amp_peak_window", minimum=1)
        value = self.amp_min_scale
        if not _is_number(value) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name}.amp_min_scale: must be a number >= 0, got {value!r}")
        value = self.amp_collapse_factor
        if not _is_number(value) or not value > 1:
            raise ValueError(f"{name}.amp_collapse_factor: must be a number > 1, got {value!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


INF = math.inf
SHARED_COMPARISONS = 8  # grad norms of two ranks at one step compared, to tell whether they share gradients
GRAD_STEPS_KEPT = 256  # steps whose first grad norm is kept for that (ranks send batches ~1 s apart)


class _Rank:
    """AMP bookkeeping of one rank."""

    __slots__ = ("scale", "overflows", "peaks", "pending", "fired")

    def __init__(self) -> None:
        self.scale: float | None = None  # grad_scale of the previous sample
        self.overflows = 0  # consecutive samples whose scale dropped
        self.peaks: deque[tuple[int, float]] = deque()  # (step, scale) of good steps, decreasing scales (update)
        self.pending: Record | None = None  # non-finite grad norm waiting for the scale drop
        self.fired = False

    def peak(self, step: int, window: int) -> float | None:
        peaks = self.peaks
        while peaks and peaks[0][0] <= step - window:
            peaks.popleft()
        return peaks[0][1] if peaks else None


class NanDivergence(Detector[NanDivergenceSettings]):
    name = "nan_divergence"
    record_types = ("start", "sample")
    Settings = NanDivergenceSettings

    def __init__(self, settings: NanDivergenceSettings, run: RunState) -> None:
        super().__init__(settings, run)
        self.ranks: dict[int, _Rank] = {}
        # rank -> (step, 0 if its own loss is non-finite else 1, time, cause, what) of its divergence
        self.diverged: dict[int, tuple[int, int, float, str, str]] = {}
        self.first: tuple[int, int, int] | None = None  # (step, own loss 0 / else 1, rank): the root
        self.first_time = 0.0
        self.first_cause = ""
        self.first_values: dict[str, float] = {}  # the root record's loss, grad_norm, grad_scale
        self.first_data: dict[str, Any] = {}  # the root's extra figures (AMP overflows, peak scale)
        self.open = False
        self.dirty = False  # ranks diverged since the alert was last told
        # Do the ranks share gradients (DDP, FSDP: every rank reports the same global grad norm at a
        # step)? Judged from the first few steps two ranks both reported: None until then.
        self.shared: bool | None = None
        self.grad_at: dict[int, float] = {}  # step -> the first finite grad norm reported for it
        self.votes = 0  # > 0: equal norms seen; < 0: different ones
        self.compared = 0
        self.story = story_of(run)  # what came before the NaN (an LR change, a rise): its timeline
        self.timeline: list[str] = []  # told with the alert: the cause, the rise, frozen when it first fired

    def update(self, record: Record) -> list[Event]:
        kind = record.type
        if kind != "sample":
            if kind == "start":
                self.story.note_start()
                return self._restart(record)
            return []
        if not self.settings.enabled:
            return []
        story = self.story
        if record is not story.noted:  # its LR, once per record for the divergence detectors together
            story.note_sample(record)
        try:  # (cheaper than .get for every sample)
            rank = self.ranks[record.rank]
        except KeyError:
            rank = self.ranks[record.rank] = _Rank()
        if rank.fired:
            return []  # terminal until a start
        loss, grad, scale = record.loss, record.grad_norm, record.grad_scale
        good = grad is None or -INF < grad < INF  # the grad norm is finite (or not sent)
        if self.compared < SHARED_COMPARISONS and grad is not None and good:
            self._compare_grad(record.step or 0, grad)
        dropped = False
        if scale is not None and -INF < scale < INF:  # finite
            before = rank.scale
            rank.scale = scale
            dropped = before is not None and scale < before
            if dropped:
                rank.pending = None  # the earlier non-finite grad norm, if any, was a skipped step
                out = self._amp(record, rank, scale)
                if out:
                    return out
            else:
                pending = rank.pending
                if pending is not None:  # the earlier non-finite grad norm was not a skipped step
                    rank.pending = None
                    return self._fire(pending, "grad_norm", pending.grad_norm, rank)
                rank.overflows = 0
                if good:  # a step that was not skipped (every sample of an fp16 run): the sliding maximum of the
                    # scale over them, a monotonic deque of (step, scale) with decreasing scales (O(1) amortized)
                    step = record.step or 0
                    peaks = rank.peaks
                    if peaks and peaks[-1][1] == scale:  # the scale of the good step before (most often): the
                        peaks[-1] = (step, scale)  # loop below would pop its entry alone (the others are higher)
                    else:
                        while peaks and peaks[-1][1] <= scale:
                            peaks.pop()
                        peaks.append((step, scale))
                    oldest = step - self.settings.amp_peak_window
                    while peaks[0][0] <= oldest:
                        peaks.popleft()
        if loss is not None and not -INF < loss < INF:
            return self._fire(record, "loss", loss, rank)
        if not good:
            if scale is None:
                return self._fire(record, "grad_norm", grad, rank)
            if not dropped:
                rank.pending = record  # the scale may drop in the next sample
        return []

    def _compare_grad(self, step: int, grad: float) -> None:
        seen = self.grad_at.get(step)
        if seen is None:
            self.grad_at[step] = grad
            if len(self.grad_at) > GRAD_STEPS_KEPT:
                del self.grad_at[next(iter(self.grad_at))]
            return
        self.compared += 1
        self.votes += 1 if abs(seen - grad) <= 1e-5 * max(abs(seen), abs(grad), 1e-30) else -1
        self.shared = self.votes > 0 if self.votes else None
        if self.compared >= SHARED_COMPARISONS:
            self.grad_at.clear()

    def _amp(self, record: Record, rank: _Rank, scale: float) -> list[Event]:
        """The scaler lowered the scale (an overflow-skipped step): divergence when the overflows keep coming
        while the scale collapses."""
        s = self.settings
        step = record.step or 0
        rank.overflows += 1
        peak = rank.peak(step, s.amp_peak_window)
        why = ""
        if rank.overflows >= s.amp_max_consecutive_overflows:
            why = f"after {rank.overflows} overflow-skipped steps in a row"
        elif scale < s.amp_min_scale:
            why = f"below {s.amp_min_scale:g}, so gradients overflow fp16 even unscaled"
        elif peak is not None and scale * s.amp_collapse_factor <= peak:
            why = f"{peak / scale if scale > 0 else math.inf:g}x below its recent peak {peak:g}"
        if not why:
            return []
        return self._fire(record, "grad_scale", scale, rank, why=why, overflows=rank.overflows,
                          peak_scale=peak)

    def _fire(self, record: Record, field: str, value: float | None, rank: _Rank, why: str = "",
              **data: Any) -> list[Event]:
        rank.fired = True
        rank.pending = None
        step = record.step or 0
        if field == "grad_scale":
            what = f"the fp16 loss scale collapsed to {value:g} ({why})"
            cause = "amp_scale_collapse"
        else:
            what = f"{field} became {value}"
            cause = f"nonfinite_{field}"
        own = 0 if field == "loss" else 1
        self.diverged[record.rank] = (step, own, record.time, cause, what)
        key = (step, own, record.rank)
        new_root = self.first is None or key < self.first
        if new_root:
            self.first, self.first_time, self.first_cause = key, record.time, cause
            self.first_values = {name: v for name in ("loss", "grad_norm", "grad_scale")
                                 if (v := getattr(record, name)) is not None}
            self.first_data = data
        elif self.open:
            # one more rank the NaN reached: told at the next tick, so a whole large job going NaN costs
            # one picture per second, not one per rank (a new root is told at once, below)
            self.dirty = True
            return []
        out = [] if self.open else self._fold_spikes(step, record.time)
        return out + [self._event(record.time)]

    def _fold_spikes(self, step: int, time: float) -> list[Event]:
        """The first NaN of the run: the rise before it (an open spike incident) and its cause (an LR change)
        become this alert's timeline, and the spike incident folds into it (resolved: one incident)."""
        story = self.story
        rise = story.rise()
        cause = story.cause(before=min((p.onset_step for p in story.parts.values()), default=step))
        self.timeline = [t for t in (cause, rise) if t]
        holder = story.holder
        story.diverged = True
        if holder is None or holder == "lr_scaling":  # lr_scaling's alert (the cause) stays: the LR is still off
            story.holder = None
            return []
        story.holder = None
        return [resolved(holder, None, step, time, f"went on to NaN at step {step} (nan_divergence): {rise}",
                         resolved_by="diverged")]

    def _event(self, time: float) -> Event:
        assert self.first is not None
        summary, data = self._picture()
        event = firing(self.name, None, self.first[0], time, summary, "critical", **data)
        event.refresh = self.open
        self.open = True
        self.dirty = False
        return event

    def tick(self, now: float) -> list[Event]:
        return [self._event(now)] if self.dirty and self.open else []

    def _picture(self) -> tuple[str, dict[str, Any]]:
        """The run's one alert: the root (ranks tied at the first step and kind), then the others."""
        assert self.first is not None
        first_step, first_own, first_rank = self.first
        roots, own_later, received = [], [], []
        for q, (step, own, _, _, _) in self.diverged.items():
            if step == first_step and own == first_own:
                roots.append(q)
            elif own == 0 and not self.shared:  # ranks that do not share gradients diverge on their own
                own_later.append(q)
            else:  # a non-finite grad norm with a finite loss, or a loss after the root's in a shared job
                received.append(q)
        roots.sort()
        what = self.diverged[first_rank][4]
        if len(roots) == 1:
            head = f"{what} at step {first_step} on {where(self.run, roots)}"
        else:
            together = "together: the all-reduced gradients" if self.shared else "each on its own"
            head = f"{what} at step {first_step} on {ranks_phrase(roots)} ({together})"
        see = " (see lr_scaling)" if self.story.lr_alert else ""  # only an alert that exists
        change = self.story.lr_change if self.timeline and self.timeline[0].startswith("LR changed") else None
        lower = (f"from before step {change.step} with the LR it had ({change.before:g})" if change is not None
                 else f"with a lower LR{see}")
        if first_own == 0:
            head += " (its own loss)" if len(roots) == 1 else ""
            their = "its" if len(roots) == 1 else "their"
            advice = f"restart from the last good checkpoint {lower}, and check {their} batch at that step"
        elif self.first_cause == "amp_scale_collapse":
            advice = ("the fix is the fp16 loss scaler, not the LR: every step overflows, so no step updates the "
                      "weights; check GradScaler's init_scale, growth_factor, backoff_factor and growth_interval, "
                      "train in bf16, or keep the layer that overflows (often attention logits or a softmax) in "
                      "fp32")
        else:
            # ranks of a job that shares gradients that have not reported the root's step yet: one of them may
            # be the rank whose own loss went NaN (the all-reduce spread it here first); the page must not say
            # "overflowed" before they are heard (their record refreshes this alert in place)
            unheard = [] if self.shared is False else sorted(
                q for q, r in self.run.ranks.items() if q not in self.diverged and not r.ended
                and r.last_step < first_step)
            if unheard:
                advice = (f"its own loss was still finite: the NaN came through the all-reduce from a rank whose "
                          f"record has not arrived yet ({ranks_phrase(unheard)}: this alert is updated when it "
                          f"does), or the gradients overflowed; restart from the last good checkpoint {lower} or "
                          f"clip gradients")
            else:
                advice = (f"the loss was still finite: the gradients overflowed; restart from the last good "
                          f"checkpoint {lower} or clip gradients")
        if self.timeline:
            head += f" (before it: {'; '.join(self.timeline)})"
        summary = f"{head}; {advice}"
        if own_later:
            steps = sorted({self.diverged[q][0] for q in own_later})
            summary += (f"; the own loss of {ranks_phrase(own_later)} became non-finite too (step "
                        f"{steps[0] if len(steps) == 1 else f'{steps[0]}-{steps[-1]}'}): the same advice holds")
        if received:
            summary += (f"; {ranks_phrase(received)} got the NaN only through the shared gradients: check "
                        f"rank {first_rank}'s batch, not theirs")
        data: dict[str, Any] = dict(self.first_data)
        data.update(self.first_values)
        data.update(cause=self.first_cause, first_rank=first_rank, first_step=first_step,
                    root_ranks=roots, own_loss_ranks=sorted(q for q, d in self.diverged.items() if d[1] == 0),
                    root_hosts=hosts_of(self.run, roots), received_ranks=sorted(received),
                    diverged_ranks=len(self.diverged), shared_gradients=self.shared, timeline=list(self.timeline))
        return summary, data

    def facts(self) -> dict[str, Any]:
        if self.first is None:
            return {}
        step, _, rank = self.first
        _, data = self._picture()
        return {"first_rank": rank, "first_step": step, "first_time": self.first_time,
                "first_cause": self.first_cause, "diverged_ranks": sorted(self.diverged),
                "root_ranks": data["root_ranks"], "own_loss_ranks": data["own_loss_ranks"],
                "received_ranks": data["received_ranks"]}

    def _restart(self, record: Record) -> list[Event]:
        if record.rank not in self.ranks:
            return []  # no sample from this rank since the run (re)started: its initial start
        step = _step_of(record, self.run)
        out = []
        if self.open and self.first is not None:
            out.append(resolved(self.name, None, step, record.time,
                                f"run restarted (start from rank {record.rank}) after divergence first on "
                                f"rank {self.first[2]}"))
        self.ranks.clear()
        self.diverged.clear()
        self.first = None
        self.first_cause = ""
        self.first_values, self.first_data = {}, {}
        self.open = self.dirty = False
        self.timeline = []
        self.story.diverged = False
        self.story.reset_spikes()
        return out
