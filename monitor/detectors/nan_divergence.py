"""nan_divergence: the loss or the grad norm became NaN/Inf, on any rank.

Every rank is checked. The alert names the rank and the exact step; when
several ranks go non-finite, the summary and the fields name the rank that went
first, where to look: the lowest non-finite step; on a tie, a rank whose loss
is non-finite before one with only a non-finite grad norm (bad data on rank 5
makes its loss NaN; the other ranks get NaN only through the all-reduce of the
gradients, in the same step); then the earliest time. Ranks send their own
batches, so the first rank's record may arrive after another rank's alert went
out: that alert keeps its guess, later alerts and the run-level ``facts()``
(``GET /v1/runs/{run}``: ``findings.nan_divergence``) carry the corrected one.

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

from ..events import Event, firing, resolved
from ..record import Record
from ..state import RunState
from .base import Detector
from .steps import step_of as _step_of
from .validate import flag, whole


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


class _Rank:
    """AMP bookkeeping of one rank."""

    __slots__ = ("scale", "overflows", "peaks", "pending", "fired")

    def __init__(self) -> None:
        self.scale: float | None = None  # grad_scale of the previous sample
        self.overflows = 0  # consecutive samples whose scale dropped
        self.peaks: deque[tuple[int, float]] = deque()  # (step, scale) of good steps, decreasing scales
        self.pending: Record | None = None  # non-finite grad norm waiting for the scale drop
        self.fired = False

    def note_good_step(self, step: int, scale: float, window: int) -> None:
        """Sliding maximum of the scale over successful steps (monotonic deque, O(1) amortized)."""
        peaks = self.peaks
        while peaks and peaks[-1][1] <= scale:
            peaks.pop()
        peaks.append((step, scale))
        while peaks[0][0] <= step - window:
            peaks.popleft()

    def peak(self, step: int, window: int) -> float | None:
        peaks = self.peaks
        while peaks and peaks[0][0] <= step - window:
            peaks.popleft()
        return peaks[0][1] if peaks else None


class NanDivergence(Detector[NanDivergenceSettings]):
    name = "nan_divergence"
    Settings = NanDivergenceSettings

    def __init__(self, settings: NanDivergenceSettings, run: RunState) -> None:
        super().__init__(settings, run)
        self.ranks: dict[int, _Rank] = {}
        # (step, 0 if the loss is non-finite else 1, time, rank) of the first divergence, and its cause
        self.first: tuple[int, int, float, int] | None = None
        self.first_cause = ""
        self.diverged: set[int] = set()

    def update(self, record: Record) -> list[Event]:
        if record.type == "start":
            return self._restart(record)
        if record.type != "sample" or not self.settings.enabled:
            return []
        rank = self.ranks.get(record.rank)
        if rank is None:
            rank = self.ranks[record.rank] = _Rank()
        if rank.fired:
            return []  # terminal until a start
        loss, grad, scale = record.loss, record.grad_norm, record.grad_scale
        out: list[Event] = []
        dropped = False
        if scale is not None and math.isfinite(scale):
            dropped = rank.scale is not None and scale < rank.scale
            pending = rank.pending
            if pending is not None:
                rank.pending = None
                if not dropped:  # the earlier non-finite grad norm was not a skipped step
                    out.append(self._fire(pending, "grad_norm", pending.grad_norm, rank))
                    return out
            out.extend(self._amp(record, rank, scale, dropped))
            rank.scale = scale
            if out:
                return out
        if loss is not None and not math.isfinite(loss):
            return [self._fire(record, "loss", loss, rank)]
        if grad is not None and not math.isfinite(grad):
            if scale is None:
                return [self._fire(record, "grad_norm", grad, rank)]
            if not dropped:
                rank.pending = record  # the scale may drop in the next sample
        return out

    def _amp(self, record: Record, rank: _Rank, scale: float, dropped: bool) -> list[Event]:
        s = self.settings
        step = record.step or 0
        if not dropped:
            rank.overflows = 0
            grad = record.grad_norm
            if grad is None or math.isfinite(grad):
                rank.note_good_step(step, scale, s.amp_peak_window)
            return []
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
        return [self._fire(record, "grad_scale", scale, rank, why=why, overflows=rank.overflows,
                           peak_scale=peak)]

    def _fire(self, record: Record, field: str, value: float | None, rank: _Rank, why: str = "",
              **data: Any) -> Event:
        rank.fired = True
        rank.pending = None
        step = record.step or 0
        if field == "grad_scale":
            what = f"the fp16 loss scale collapsed to {value:g} ({why})"
            cause = "amp_scale_collapse"
        else:
            what = f"{field} became {value}"
            cause = f"nonfinite_{field}"
        key = (step, 0 if field == "loss" else 1, record.time, record.rank)
        if self.first is None or key < self.first:
            self.first = key
            self.first_cause = cause
        self.diverged.add(record.rank)
        first_step, _, _, first_rank = self.first
        where = f"at step {step} on rank {record.rank}"
        if first_rank == record.rank:
            advice = ("restart from the last good checkpoint with a lower LR (see lr_scaling), "
                      f"and check rank {record.rank}'s batch at that step")
        else:
            advice = (f"rank {first_rank} went non-finite first, at step {first_step}: "
                      f"check its batch at that step, then restart from the last good checkpoint")
        summary = f"{what} {where}; {advice}"
        data.update(cause=cause, first_rank=first_rank, first_step=first_step,
                    diverged_ranks=len(self.diverged))
        for name in ("loss", "grad_norm", "grad_scale"):
            v = getattr(record, name)
            if v is not None:
                data[name] = v
        return firing(self.name, record.rank, step, record.time, summary, "critical", **data)

    def facts(self) -> dict[str, Any]:
        if self.first is None:
            return {}
        step, _, time, rank = self.first
        return {"first_rank": rank, "first_step": step, "first_time": time, "first_cause": self.first_cause,
                "diverged_ranks": sorted(self.diverged)}

    def _restart(self, record: Record) -> list[Event]:
        if record.rank not in self.ranks:
            return []  # no sample from this rank since the run (re)started: its initial start
        step = _step_of(record, self.run)
        out = [resolved(self.name, r, step, record.time,
                        f"run restarted (start from rank {record.rank}) after divergence on rank {r}")
               for r in sorted(self.diverged)]
        self.ranks.clear()
        self.diverged.clear()
        self.first = None
        self.first_cause = ""
        return out
