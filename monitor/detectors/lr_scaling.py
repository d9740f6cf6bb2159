"""lr_scaling: the LR does not follow the linear scaling rule, or a large batch has no warmup.

Linear Scaling Rule (Goyal et al.): when the total batch is multiplied by k,
multiply the LR by k. From each ``start`` record:

    total batch = batch_size x world_size
    expected LR = reference_lr x total batch / reference_batch_size

The reference is the start's own ``reference_lr``/``reference_batch_size``,
else the latest earlier start of the run that carried them, else the run's
first start (its ``lr`` for its total batch): an elastic resize that keeps the
old LR fires at the new start; a resize that scales the LR is quiet.

Fires (one run-wide alert, rank None; the field ``start_rank`` says which rank
sent the start) when
- the start's ``lr`` is ``factor`` (default 1.5) or more times off, either
  way (in the seed's measurements 2x and 4x too low cost 4-5 mAP; 8x too high
  made the loss NaN);
- a sample's ``lr`` is ``factor`` or more times above the expected LR (the
  schedule overshoots what the start claimed). Samples are only checked
  upwards: a run resumed late in its schedule legitimately runs below peak;
- a large total batch (>= ``large_batch``, default 2048) or an LR scaled up
  ``large_scale_up`` (default 8) or more times from the reference LR runs with
  no warmup (``warmup_steps`` 0 or missing).

Severity: ``critical`` when the LR is ``critical_factor`` (default 4) or more
times too high (the seed's NaN case was 8x; 4x is halfway in log terms and
already past where small batches diverge); ``warning`` otherwise (too low an
LR costs accuracy, it does not crash); ``info`` for the optimizers in
``advisory_optimizers`` (LARS, LAMB: layer-wise adaptive rates make the rule
advisory). A later start that fixes the numbers resolves the alert; a later
start with different wrong numbers resolves it and fires again with the new
ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, TypeGuard

from ..events import Event, Severity, firing, resolved
from ..record import Record
from ..state import RunState
from .base import Detector
from .steps import step_of as _step_of
from .validate import flag, whole


@dataclass(kw_only=True, slots=True)
class LrScalingSettings:
    enabled: bool = True
    factor: float = 1.5
    critical_factor: float = 4.0
    large_batch: int = 2048
    large_scale_up: float = 8.0
    check_samples: bool = True
    advisory_optimizers: tuple[str, ...] = ("lars", "lamb")

    def __post_init__(self) -> None:
        name = "lr_scaling"
        flag(self, name, "enabled", "check_samples")
        for key in ("factor", "critical_factor", "large_scale_up"):
            value = getattr(self, key)
            if (not isinstance(value, (int, float)) or isinstance(value, bool)
                    or not math.isfinite(value) or value <= 1):
                raise ValueError(f"{name}.{key}: must be a number > 1, got {value!r}")
        if self.critical_factor < self.factor:
            raise ValueError(f"{name}.critical_factor: must be >= factor ({self.factor:g}), "
                             f"got {self.critical_factor!r}")
        whole(self, name, "large_batch", minimum=1)
        names = self.advisory_optimizers
        if isinstance(names, list):
            names = self.advisory_optimizers = tuple(names)  # TOML arrays arrive as lists
        if not isinstance(names, tuple) or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"{name}.advisory_optimizers: must be a list of names, got {names!r}")


@dataclass(slots=True, frozen=True)
class Finding:
    """What one start (or sample) says; ``key`` decides whether it changed."""

    key: tuple[Any, ...]
    summary: str
    severity: Severity
    data: dict[str, Any]


class LrScaling(Detector[LrScalingSettings]):
    name = "lr_scaling"
    Settings = LrScalingSettings

    def __init__(self, settings: LrScalingSettings, run: RunState) -> None:
        super().__init__(settings, run)
        self.reference: tuple[float, int, str] | None = None  # (lr, total batch, where from)
        self.explicit: tuple[float, int] | None = None  # latest reference carried by a start
        self.current: dict[str, Any] | None = None  # expected LR etc. of the latest usable start
        self.open: Finding | None = None
        self.max_lr = 0.0  # highest sample LR since the latest start

    # -- records --------------------------------------------------------------
    def update(self, record: Record) -> list[Event]:
        if not self.settings.enabled:
            return []
        if record.type == "start":
            return self._start(record)
        lr = record.lr
        if record.type != "sample" or not _usable(lr) or lr <= self.max_lr or self.current is None:
            return []
        if not self.settings.check_samples or (record.step or 0) < (self.current["warmup_steps"] or 0):
            return []  # judged at the peak: after the warmup
        self.max_lr = lr
        return self._sample(record, lr)

    def _start(self, rec: Record) -> list[Event]:
        self.max_lr = 0.0
        if rec.reference_lr is not None and rec.reference_batch_size:
            self.explicit = (rec.reference_lr, rec.reference_batch_size)
        if rec.batch_size is None or rec.world_size is None or not _usable(rec.lr):
            return []  # nothing to check (an LR of 0, NaN or inf is no peak LR to judge)
        total = rec.batch_size * rec.world_size
        if self.explicit is not None:
            ref_lr, ref_batch = self.explicit
            where = "reference"
        elif self.reference is not None:
            ref_lr, ref_batch, where = self.reference
        else:
            ref_lr, ref_batch, where = rec.lr, total, "first start"
        if self.reference is None and total > 0:
            self.reference = (rec.lr, total, "first start")
        ok = total > 0 and ref_batch > 0 and ref_lr > 0 and math.isfinite(ref_lr)
        expected = ref_lr * total / ref_batch if ok else None
        if not _usable(expected):  # over- or underflow of absurd values: nothing to compare with
            expected = None
        self.current = dict(expected_lr=expected, total_batch=total, reference_lr=ref_lr,
                            reference_batch_size=ref_batch, reference=where,
                            warmup_steps=rec.warmup_steps, optimizer=rec.optimizer,
                            start_rank=rec.rank)
        return self._settle(rec, self._judge(rec.lr, rec, f"LR {rec.lr:g}"))

    def _sample(self, rec: Record, lr: float) -> list[Event]:
        cur = self.current
        assert cur is not None
        expected = cur["expected_lr"]
        if expected is None or not lr >= expected * self.settings.factor:
            return []
        if self.open is not None and "lr_mismatch" in self.open.data["problems"]:
            return []  # the open alert already says the LR is off
        return self._settle(rec, self._judge(lr, rec, f"LR {lr:g} (sampled at step {rec.step})"))

    # -- judgement ------------------------------------------------------------
    def _judge(self, lr: float, rec: Record, what: str) -> Finding | None:
        s = self.settings
        cur = self.current
        assert cur is not None
        expected, total = cur["expected_lr"], cur["total_batch"]
        ref_lr, ref_batch = cur["reference_lr"], cur["reference_batch_size"]
        ref_text = (f"reference LR {ref_lr:g} for batch {ref_batch}" if cur["reference"] == "reference"
                    else f"the run's first start: LR {ref_lr:g} for batch {ref_batch}")
        parts: list[str] = []
        ratio = lr / expected if expected else None
        if not (_usable(ratio) and _usable(1 / ratio)):  # 0 or inf after an under- or overflow
            ratio = None
        mismatch = ratio is not None and (ratio >= s.factor or ratio * s.factor <= 1)
        if mismatch:
            assert ratio is not None and expected is not None
            how = f"{_times(ratio)}x" if ratio >= 1 else f"{_times(1 / ratio)}x below"
            batch = _batch_for(lr, ref_lr, ref_batch)
            parts.append(f"{what} is {how} the linear-scaling value {expected:g} for total "
                         f"batch {total} ({ref_text}); set lr={expected:g}"
                         + (f" or a total batch of {batch}" if batch is not None else ""))
        scale_up = lr / ref_lr if ref_lr > 0 else 1.0
        warm = cur["warmup_steps"]
        no_warmup = not warm and (total >= s.large_batch or scale_up >= s.large_scale_up)
        if no_warmup:
            why = f"total batch {total}" if total >= s.large_batch else f"an LR {scale_up:.1f}x the reference"
            parts.append(f"{why} runs at LR {lr:g} with no warmup; add a linear warmup "
                         f"(Goyal et al. warm up over 5 epochs) before the peak LR")
        if not parts:
            return None
        optimizer = cur["optimizer"] or ""
        advisory = any(n.lower() in optimizer.lower() for n in s.advisory_optimizers)
        severity: Severity
        if advisory:
            severity = "info"
        elif ratio is not None and ratio >= s.critical_factor:
            severity = "critical"
        else:
            severity = "warning"
        summary = "; also ".join(parts)
        if advisory:
            summary += f" (advisory: {optimizer} adapts per-layer rates)"
        problems = (["lr_mismatch"] if mismatch else []) + (["no_warmup"] if no_warmup else [])
        data = dict(cur, lr=lr, ratio=ratio, problems=problems)
        key = (round(lr, 12), expected, total, tuple(problems), severity)
        return Finding(key, summary, severity, data)

    def _settle(self, rec: Record, finding: Finding | None) -> list[Event]:
        """Resolve, fire, or replace the open alert; quiet when nothing changed."""
        step = _step_of(rec, self.run)
        old = self.open
        if finding is None and old is None:
            return []
        if finding is not None and old is not None and finding.key == old.key:
            return []
        out: list[Event] = []
        if old is not None:
            why = "a new start fixed it" if finding is None else "superseded"
            out.append(resolved(self.name, None, step, rec.time,
                                f"{why} (rank {rec.rank} at step {step}): {self._now()}"))
        if finding is not None:
            out.append(firing(self.name, None, step, rec.time, finding.summary, finding.severity,
                              **finding.data))
        self.open = finding
        return out

    def _now(self) -> str:
        cur = self.current
        if cur is None or cur["expected_lr"] is None:
            return "LR now matches"
        return f"total batch {cur['total_batch']}, expected LR {cur['expected_lr']:g}"


def _batch_for(lr: float, ref_lr: float, ref_batch: int) -> int | None:
    """The total batch for which ``lr`` would be right (None when no job could have it)."""
    batch = ref_batch * lr / ref_lr
    return max(1, round(batch)) if batch < 2**63 else None


def _times(x: float) -> str:
    return f"{x:.1f}" if x < 1e6 else f"{x:.3g}"


def _usable(x: float | None) -> TypeGuard[float]:
    """A positive finite number (an LR, a ratio of LRs)."""
    return x is not None and 0 < x < math.inf
