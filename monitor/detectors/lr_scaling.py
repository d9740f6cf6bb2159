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
  no warmup (``warmup_steps`` 0 or missing), **and the LR rose**: ``factor`` or
  more times the reference LR at the run's first start, or the previous start's
  LR at a restart. Warmup exists to ease an LR going up (Goyal et al.); a large
  batch at an LR that did not rise needs none, and a resume at the LR it had
  needs none;
- the warmup a start declares is not the one the sampled LR shows (helpers/lr_warmup.py):
  at its peak from the first steps, or still below it long after ``warmup_steps``.

**A batch that grows at the same LR is an LR decay** (Smith et al., "Don't Decay
the Learning Rate, Increase the Batch Size"): a restart whose LR is below the
linear-scaling value because its total batch grew while its LR stayed (or fell)
against an earlier start of the run is ``info``, says so, and never advises
raising the LR. The first start of a run judged against an explicit reference
keeps the warning: the seed measured that keeping a 2-GPU LR on 8 GPUs cost 4-5 mAP.

Severity: ``critical`` when the LR is ``critical_factor`` (default 4) or more
times too high (the seed's NaN case was 8x; 4x is halfway in log terms and
already past where small batches diverge); ``warning`` otherwise (too low an
LR costs accuracy, it does not crash; a warmup not applied as declared);
``info`` for the optimizers in ``advisory_optimizers`` (LARS, LAMB: layer-wise
adaptive rates make the rule advisory) and for an LR decay by batch growth. A
later start that fixes the numbers resolves the alert; a later start with
different wrong numbers resolves it and fires again with the new ones. What the
warmup check finds joins the start's finding in the same run-wide alert.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, TypeGuard

from ..config.rules import above, flag, ordered, whole
from ..events import Event, Severity, firing, resolved
from ..record import Record
from ..state import RunState
from .base import Detector
from .helpers.divergence_story import story_of
from .helpers.lr_warmup import WarmupCheck, WarmupFinding
from .helpers.steps import step_of as _step_of

SAME_LR = 1.05  # an LR within 5% of an earlier one "stayed"
MAX_HISTORY = 16  # earlier (total batch, LR) pairs kept for the batch-growth reading
_ORDER = {"info": 0, "warning": 1, "critical": 2}


@dataclass(kw_only=True, slots=True)
class LrScalingSettings:
    enabled: bool = True
    factor: float = 1.5
    critical_factor: float = 4.0
    large_batch: int = 2048
    large_scale_up: float = 8.0
    check_samples: bool = True
    advisory_optimizers: tuple[str, ...] = ("lars", "lamb")
    check_warmup: bool = True  # compare the declared warmup_steps with the sampled LR
    late_factor: float = 2.0  # "still below its peak" is judged from step late_factor x warmup_steps
    # the scaling rule: "auto" = square root for these optimizers (substring match on the start's optimizer,
    # case-insensitive: Adam-family, Malladi et al. 2022), linear for the rest (SGD: Goyal et al.);
    # "linear" or "sqrt" forces one rule for every optimizer
    rule: str = "auto"
    sqrt_optimizers: tuple[str, ...] = ("adam", "rmsprop", "adagrad", "adafactor")

    def __post_init__(self) -> None:
        name = "lr_scaling"
        flag(self, name, "enabled", "check_samples", "check_warmup")
        above(self, name, 1.0, "factor", "critical_factor", "large_scale_up", "late_factor")
        ordered(self, name, "critical_factor", ">=", self.factor, "factor", spec="g")
        whole(self, name, "large_batch", minimum=1)
        for key in ("advisory_optimizers", "sqrt_optimizers"):
            names = getattr(self, key)
            if isinstance(names, list):
                names = tuple(names)  # TOML arrays arrive as lists
                setattr(self, key, names)
            if not isinstance(names, tuple) or not all(isinstance(n, str) and n for n in names):
                raise ValueError(f"{name}.{key}: must be a list of names, got {names!r}")
        if self.rule not in ("auto", "linear", "sqrt"):
            raise ValueError(f"{name}.rule: must be \"auto\", \"linear\" or \"sqrt\", got {self.rule!r}")

    def sqrt_rule(self, optimizer: str | None) -> bool:
        """Whether the square-root rule applies to this optimizer (else the linear one)."""
        if self.rule != "auto":
            return self.rule == "sqrt"
        opt = (optimizer or "").lower()
        return bool(opt) and any(n.lower() in opt for n in self.sqrt_optimizers)


@dataclass(slots=True, frozen=True)
class Finding:
    """What one start (or sample) says; ``key`` decides whether it changed."""

    key: tuple[Any, ...]
    summary: str
    severity: Severity
    data: dict[str, Any]


class LrScaling(Detector[LrScalingSettings]):
    name = "lr_scaling"
    record_types = ("start", "sample")
    Settings = LrScalingSettings

    def __init__(self, settings: LrScalingSettings, run: RunState) -> None:
        super().__init__(settings, run)
        self.reference: tuple[float, int, str] | None = None  # (lr, total batch, where from)
        self.explicit: tuple[float, int] | None = None  # latest reference carried by a start
        self.current: dict[str, Any] | None = None  # expected LR etc. of the latest usable start
        self.open: Finding | None = None  # what the alert says now: judged + warmup
        self.judged: Finding | None = None  # from the latest start (or a sampled LR above the rule)
        self.warmup: Finding | None = None  # from the warmup check of the latest start
        self.warmup_check: WarmupCheck | None = None
        self.history: list[tuple[int, float]] = []  # (total batch, LR) of earlier usable starts
        self.max_lr = 0.0  # highest sample LR since the latest start
        # a sample whose LR is at most this changes nothing and says nothing (``_note_quiet``)
        self.quiet = math.inf
        self.entry_ranks: set[int] = set()  # ranks whose start carried the latest (total batch, LR)

    # -- records --------------------------------------------------------------
    def update(self, record: Record) -> list[Event]:
        kind = record.type
        if kind == "sample":
            lr = record.lr
            if lr is None or lr <= self.quiet:
                return []  # the common sample
            out = self._sample_lr(record, lr)
            self._note_quiet()
            return out
        if kind == "start" and self.settings.enabled:
            out = self._start(record)
            self._note_quiet()
            return out
        return []

    def _note_quiet(self) -> None:
        """The LR up to which a sample is quiet: any before a usable start; none while the warmup is checked (each
        sampled LR counts); else the highest sampled LR judged since the start (what is not above it says no
        more). The settings are not in it: a disabled detector's samples are quiet anyway."""
        check = self.warmup_check
        self.quiet = (math.inf if self.current is None else -math.inf if check is not None and check.active
                      else self.max_lr)

    def _sample_lr(self, record: Record, lr: float) -> list[Event]:
        s = self.settings
        if not s.enabled or not 0 < lr < math.inf or self.current is None:
            return []  # (not _usable(lr))
        check = self.warmup_check
        if (check is None or not check.active) and lr <= self.max_lr:
            return []  # no warmup to check, and not above the highest LR judged
        out: list[Event] = []
        if check is not None and check.active and record.step is not None and s.check_warmup:
            found = check.add(record.step, lr)
            if found is not None:
                self.warmup = self._warmup_finding(found)
                out += self._settle(record, self._combined())
        if lr <= self.max_lr or not self.settings.check_samples:
            return out
        if (record.step or 0) < (self.current["warmup_steps"] or 0):
            return out  # judged at the peak: after the warmup
        self.max_lr = lr
        return out + self._sample(record, lr)

    def _start(self, rec: Record) -> list[Event]:
        self.max_lr = 0.0
        self.warmup, self.warmup_check = None, None
        if rec.reference_lr is not None and rec.reference_batch_size:
            self.explicit = (rec.reference_lr, rec.reference_batch_size)
        if rec.batch_size is None or rec.world_size is None or not _usable(rec.lr):
            self.judged = None
            return self._settle(rec, self._combined())  # nothing to check (an LR of 0, NaN or inf is no peak)
        if rec.warmup_steps:
            self.warmup_check = WarmupCheck(rec.warmup_steps, rec.lr, self.settings.late_factor)
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
        sqrt = self.settings.sqrt_rule(rec.optimizer)
        expected = ref_lr * (math.sqrt(total / ref_batch) if sqrt else total / ref_batch) if ok else None
        if not _usable(expected):  # over- or underflow of absurd values: nothing to compare with
            expected = None
        earlier = self.history
        # the LR "rose" at this start: against the previous start, or (first start) the reference. Every rank
        # of a restart sends its start: another rank's start with the same numbers is the same restart, and
        # keeps what the first one said (else the second start would undo it: a resolve and a second page)
        base_lr = earlier[-1][1] if earlier else ref_lr
        same = (self.current is not None and bool(earlier) and earlier[-1] == (total, rec.lr)
                and rec.rank not in self.entry_ranks)
        rose = rec.lr >= self.settings.factor * base_lr
        lr_rose = self.current["lr_rose"] if same and self.current is not None else rose
        self.entry_ranks = self.entry_ranks | {rec.rank} if same else {rec.rank}
        grown_from = min((b for b, lr in earlier if b < total and rec.lr <= lr * SAME_LR), default=None)
        self.current = dict(expected_lr=expected, total_batch=total, reference_lr=ref_lr,
                            reference_batch_size=ref_batch, reference=where,
                            warmup_steps=rec.warmup_steps, optimizer=rec.optimizer,
                            start_rank=rec.rank, lr_rose=lr_rose,
                            grown_from=grown_from, rule="sqrt" if sqrt else "linear",
                            batches=sorted({ref_batch, total, *(b for b, _ in earlier)}))
        if total > 0 and (not earlier or earlier[-1] != (total, rec.lr)):
            earlier.append((total, rec.lr))
            if len(earlier) > MAX_HISTORY:
                del earlier[0]
        self.judged = self._judge(rec.lr, rec, f"LR {rec.lr:g}")
        return self._settle(rec, self._combined())

    def _sample(self, rec: Record, lr: float) -> list[Event]:
        cur = self.current
        assert cur is not None
        expected = cur["expected_lr"]
        if expected is None or not lr >= expected * self.settings.factor:
            return []
        if self.judged is not None and {"lr_mismatch", "batch_growth_decay"} & set(self.judged.data["problems"]):
            return []  # the open alert already says the LR is off
        self.judged = self._judge(lr, rec, f"LR {lr:g} (sampled at step {rec.step})", sampled=True)
        return self._settle(rec, self._combined())

    # -- judgement ------------------------------------------------------------
    def _judge(self, lr: float, rec: Record, what: str, sampled: bool = False) -> Finding | None:
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
        grown = cur["grown_from"]
        decay = mismatch and not sampled and ratio is not None and ratio < 1 and grown is not None
        if decay:  # Smith et al.: a larger batch at the same LR is an LR decay, not a mistake
            assert ratio is not None
            mismatch = False
            parts.append(f"total batch {total} is {_times(total / grown)}x the {grown} of an earlier start at "
                         f"the same LR {lr:g} (or a lower one): growing the batch at a constant LR acts as an LR "
                         f"decay of ~{_times(1 / ratio)}x against linear scaling (Smith et al., \"Don't Decay "
                         f"the Learning Rate, Increase the Batch Size\"); nothing to change if that decay is "
                         f"intended")
        elif mismatch:
            assert ratio is not None and expected is not None
            how = f"{_times(ratio)}x" if ratio >= 1 else f"{_times(1 / ratio)}x below"
            sqrt = cur["rule"] == "sqrt"
            batch = _batch_for(lr, ref_lr, ref_batch, sqrt)
            known = cur["batches"]
            if batch is not None and not known[0] <= batch <= known[-1]:
                batch = None  # a batch this run never had is no advice (a 166,667x LR would ask for 5 million)
            rule = "square-root-scaling" if sqrt else "linear-scaling"
            parts.append(f"{what} is {how} the {rule} value {expected:g} for total "
                         f"batch {total} ({ref_text}"
                         + (f"; {cur['optimizer']}: LR x sqrt(batch ratio), Malladi et al. 2022" if sqrt else "")
                         + f"); set lr={expected:g}"
                         + (f" or a total batch of {batch}" if batch is not None else ""))
        scale_up = lr / ref_lr if ref_lr > 0 else 1.0
        warm = cur["warmup_steps"]
        no_warmup = (not warm and cur["lr_rose"] and not sampled
                     and (total >= s.large_batch or scale_up >= s.large_scale_up))
        if no_warmup:
            why = f"total batch {total}" if total >= s.large_batch else f"an LR {scale_up:.1f}x the reference"
            parts.append(f"{why} runs at LR {lr:g} with no warmup; add a linear warmup "
                         f"(Goyal et al. warm up over 5 epochs) before the peak LR")
        if not parts:
            return None
        optimizer = cur["optimizer"] or ""
        advisory = any(n.lower() in optimizer.lower() for n in s.advisory_optimizers)
        severity: Severity
        if advisory or (decay and not no_warmup):
            severity = "info"
        elif ratio is not None and ratio >= s.critical_factor:
            severity = "critical"
        else:
            severity = "warning"
        summary = "; also ".join(parts)
        if advisory:
            summary += f" (advisory: {optimizer} adapts per-layer rates)"
        problems = ((["lr_mismatch"] if mismatch else []) + (["batch_growth_decay"] if decay else [])
                    + (["no_warmup"] if no_warmup else []))
        data = dict(cur, lr=lr, ratio=ratio, problems=problems)
        del data["lr_rose"], data["grown_from"], data["batches"]
        if decay:
            data["grown_from_batch"] = grown
        key = (round(lr, 12), expected, total, tuple(problems), severity)
        return Finding(key, summary, severity, data)

    def _warmup_finding(self, found: WarmupFinding) -> Finding:
        cur = self.current
        assert cur is not None
        data = dict(warmup_steps=cur["warmup_steps"], applied_warmup_steps=found.applied_steps,
                    start_rank=cur["start_rank"], problems=[found.problem])
        return Finding((found.problem, found.applied_steps), found.text, "warning", data)

    def _combined(self) -> Finding | None:
        """One run-wide alert: the start's (or sample's) finding and the warmup check's, joined."""
        a, b = self.judged, self.warmup
        if a is None or b is None:
            return a or b
        severity = a.severity if _ORDER[a.severity] >= _ORDER[b.severity] else b.severity
        data = {**b.data, **a.data, "problems": a.data["problems"] + b.data["problems"],
                "applied_warmup_steps": b.data["applied_warmup_steps"]}
        return Finding((a.key, b.key), f"{a.summary}; also {b.summary}", severity, data)

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
        story = story_of(self.run)
        story.lr_alert = finding is not None
        too_high = finding is not None and "lr_mismatch" in finding.data.get("problems", ()) and (
            finding.data.get("ratio") or 0) > 1
        story.lr_finding = (finding.summary, finding.severity, finding.data) if too_high and finding else None
        if old is not None and story.holder == self.name:  # the rise it held is told anew by the spike detectors
            story.reset_spikes()
        return out

    def _now(self) -> str:
        cur = self.current
        if cur is None or cur["expected_lr"] is None:
            return "LR now matches"
        return f"total batch {cur['total_batch']}, expected LR {cur['expected_lr']:g}"


def _batch_for(lr: float, ref_lr: float, ref_batch: int, sqrt: bool) -> int | None:
    """The total batch for which ``lr`` would be right (None when no job could have it)."""
    r = lr / ref_lr
    batch = ref_batch * (r * r if sqrt else r)  # a product overflows to inf where ** would raise
    return max(1, round(batch)) if batch < 2**63 else None


def _times(x: float) -> str:
    return f"{x:.1f}" if x < 1e6 else f"{x:.3g}"


def _usable(x: float | None) -> TypeGuard[float]:
    """A positive finite number (an LR, a ratio of LRs)."""
    return x is not None and 0 < x < math.inf
