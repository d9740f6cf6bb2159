"""Declared against applied warmup: does the sampled LR follow the ``warmup_steps`` a start declared?

A start declares ``warmup_steps = N`` and its peak ``lr``. A run that starts from scratch (its first
sample at or before step N/2) and applies that warmup samples an LR well below the peak in the first
half of the warmup (a linear warmup from 1/3 of the peak, Detectron's and torch's LinearLR default, is
at 2/3 of it at N/2; any warmup starting below 0.9 of its peak is under 0.95 there), and reaches the
peak by about step N. Two ways it goes wrong, both silent in the loss at first:

- the LR is at its peak from the first steps: the warmup is not applied (the scheduler is built but
  never stepped, or a warmup flag is ignored). Decided at the third sample at the peak in the first
  half of the warmup with none below it, or at the first sample past N/2;
- the LR is still below 0.9 of its peak at step ``late_factor`` x N: the scheduler is stepped per
  epoch instead of per iteration (the warmup then lasts N *epochs*), or never stepped at all (the LR
  stays at its starting fraction). The applied warmup length is estimated from the LR's climb.

One check per start; O(1) per sample, and idle once it has decided.
"""

from __future__ import annotations

from dataclasses import dataclass

AT_PEAK = 0.95  # a sampled LR this close to the declared peak is at it
REACHED = 0.9  # a warmup has reached its peak once the LR got this close
FLAT = 1e-6  # an LR that never moved more than this (relative to its peak) was never stepped
SAMPLES_AT_PEAK = 3  # samples at the peak in the warmup's first half that decide "not applied"
MIN_WARMUP_STEPS = 4  # shorter declared warmups are not judged


@dataclass(slots=True)
class WarmupFinding:
    problem: str  # "warmup_not_applied" or "warmup_too_slow"
    text: str
    applied_steps: int | None  # the warmup the samples show (0: none; None: cannot tell)


class WarmupCheck:
    """Watches the samples after one start; ``add`` returns a finding once, then goes idle."""

    __slots__ = ("declared", "peak", "late_factor", "active", "first", "at_peak", "below", "max_lr", "min_lr")

    def __init__(self, declared: int, peak: float, late_factor: float) -> None:
        self.declared, self.peak, self.late_factor = declared, peak, late_factor
        self.active = declared >= MIN_WARMUP_STEPS
        self.first: tuple[int, float] | None = None  # (step, lr) of the first sample
        self.at_peak = self.below = 0  # samples in the first half of the warmup
        self.max_lr, self.min_lr = 0.0, float("inf")

    def add(self, step: int, lr: float) -> WarmupFinding | None:
        if not self.active:
            return None
        n, peak = self.declared, self.peak
        if self.first is None:
            if step > n / 2:  # resumed past the warmup (or sampled too sparsely to tell): not judged
                self.active = False
                return None
            self.first = (step, lr)
        self.max_lr, self.min_lr = max(self.max_lr, lr), min(self.min_lr, lr)
        if step <= n / 2:
            if lr >= AT_PEAK * peak:
                self.at_peak += 1
            else:
                self.below += 1
            if self.at_peak >= SAMPLES_AT_PEAK and self.below == 0:
                return self._not_applied(step)
            return None
        if self.below == 0 and self.at_peak > 0:
            return self._not_applied(step)
        if self.max_lr >= REACHED * peak:
            self.active = False  # the warmup reached its peak: done
            return None
        if step < self.late_factor * n:
            return None
        self.active = False
        return self._too_slow(step, lr)

    def _not_applied(self, step: int) -> WarmupFinding:
        self.active = False
        return WarmupFinding(
            "warmup_not_applied",
            f"warmup_steps={self.declared} is declared but the sampled LR is at its peak {self.peak:g} from "
            f"step {self.first[0] if self.first else step} on (applied warmup: 0 steps); the warmup is likely "
            f"not applied: a scheduler built but never stepped, or a warmup setting that is ignored",
            0)

    def _too_slow(self, step: int, lr: float) -> WarmupFinding:
        n, peak = self.declared, self.peak
        assert self.first is not None
        s0, lr0 = self.first
        head = (f"warmup_steps={n} is declared but at step {step} the sampled LR is {lr:g}, "
                f"{lr / peak:.2f}x its peak {peak:g}")
        if self.max_lr - self.min_lr <= FLAT * peak:
            return WarmupFinding("warmup_too_slow", head + " and has not moved since the start; the scheduler is "
                                 "likely never stepped (call scheduler.step() every iteration)", None)
        applied = None
        if lr > lr0 and step > s0:
            applied = round(s0 + (peak - lr0) * (step - s0) / (lr - lr0))
        est = f" (at this pace the warmup takes ~{applied} steps)" if applied is not None else ""
        return WarmupFinding("warmup_too_slow", head + est + "; the scheduler is likely stepped per epoch instead "
                             "of per iteration (warmup_steps counts optimizer steps)", applied)
