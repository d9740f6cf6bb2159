"""One divergence, one story: what the divergence detectors of a run saw, shared between them.

lr_scaling, loss_spike, grad_explosion and nan_divergence watch one run each; a divergence shows in all of
them (the LR went up, then the loss and the grad norm rose, then NaN). They share one ``Story`` per run
(``story_of(run)``, kept in the run's ``notes``; the detectors run in that order on every record), so:

- the spikes of every rank, loss and grad norm together, are **one run-level alert** (``rank`` null): the
  first of loss_spike/grad_explosion to fire holds it; the other's findings refresh it in place (no page);
- the NaN alert tells the **timeline** ("LR changed 0.1 -> 2 at step 3000 (20x, at a resume); loss and grad
  norm rose from step 3001; ...") and the open spike alert folds into it (resolved: "went on to NaN");
- advice names only alerts that exist (``lr_alert``: lr_scaling has one open for the run);
- a rise that follows an LR lr_scaling already called too high joins lr_scaling's alert (its cause, already
  paged) as a refresh: the LR, the rise and the NaN are two pages, not four.

Pure data: no I/O, no clock. docs/divergence.md describes the incidents.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ...record import Record
from ...state import RunState
from .incident import ranks_phrase

LR_JUMP = 4.0  # an LR that rises this many times from one sample (or start) to the next is a change worth naming

Label = Literal["loss", "grad norm"]


@dataclass(slots=True)
class LrChange:
    before: float
    after: float
    step: int
    at_start: bool  # seen across a start record (a resume)

    def text(self) -> str:
        ratio = self.after / self.before
        where = ", at a resume" if self.at_start else ""
        return f"LR changed {self.before:g} -> {self.after:g} at step {self.step} ({ratio:.3g}x{where})"


@dataclass(slots=True)
class Part:
    """One signal (the loss, or the grad norm) of the spike incident: which ranks are high, since when."""

    label: Label
    ranks: set[int] = field(default_factory=set)  # ranks high now
    seen: set[int] = field(default_factory=set)  # every rank that was high in this incident
    first_rank: int = 0
    onset_step: int = 0  # first high sample of the first rank
    value: float = 0.0  # the first rank's value when it fired, and how far above its baseline
    baseline: float = 0.0
    ratio: float = 0.0
    how: str = ""  # how the first rank's value was judged: "robust", "soft" or "early"
    text: str = ""  # the first rank's finding, as said in the summary
    recovered: str = ""  # "loss back to 2.1 at step 420": every rank of this part came back


@dataclass(slots=True)
class Story:
    lr: float | None = None  # latest sampled (or started) LR and its step
    lr_step: int = -1
    lr_change: LrChange | None = None  # the latest upward LR change of LR_JUMP or more
    resumed: bool = False  # a start came since the latest sampled LR
    lr_alert: bool = False  # lr_scaling has an open alert for the run
    # lr_scaling's open finding when it says the LR is too high: (summary, severity, fields). A rise that
    # follows joins that alert (its cause) instead of paging on its own
    lr_finding: tuple[str, str, dict[str, Any]] | None = None
    holder: str | None = None  # the alert that holds the run's spike incident (loss_spike or grad_explosion)
    parts: dict[str, Part] = field(default_factory=dict)  # by label, in the order they fired
    diverged: bool = False  # the run went NaN: the spike incident folded into nan_divergence until a restart
    noted: Record | None = None  # the latest sample whose LR was noted (``note_sample``)

    # -- the LR ---------------------------------------------------------------------------------------
    def note_lr(self, lr: float, step: int | None) -> None:
        """A sample's LR (a start's ``lr`` is what it declares, often the peak: not what runs)."""
        if not 0 < lr < float("inf"):
            return
        step = step if step is not None else self.lr_step
        if step < self.lr_step:
            return  # an older sample of a slower rank
        before = self.lr
        if before is not None and lr >= LR_JUMP * before:
            self.lr_change = LrChange(before, lr, step, self.resumed)
        self.lr, self.lr_step, self.resumed = lr, step, False

    def note_sample(self, record: Record) -> None:
        """A sample's LR: each divergence detector calls this for a sample unless it is ``noted`` already (the
        detectors of the run see the same record one after the other, and noting it again changes nothing)."""
        self.noted = record
        lr = record.lr
        if lr is None:
            return
        step = record.step
        if lr == self.lr and step is not None and step >= self.lr_step and not self.resumed:
            self.lr_step = step  # the LR it has: all that note_lr would do
        else:
            self.note_lr(lr, step)

    def note_start(self) -> None:
        """A rank (re)started: an LR change seen next is "at a resume"."""
        if self.lr is not None:
            self.resumed = True

    # -- the spike incident ---------------------------------------------------------------------------
    def summary(self, advice: str) -> str:
        parts = list(self.parts.values())
        texts = [p.text + (f" (also {ranks_phrase(p.seen - {p.first_rank})})" if len(p.seen) > 1 else "")
                 + (f"; since then {p.recovered}" if p.recovered else "") for p in parts]
        cause = self.cause(before=min(p.onset_step for p in parts))
        head = "; ".join(texts)
        if cause:
            head += f"; after {cause}"
        return f"{head}; {advice}" if advice else head

    def fields(self) -> dict[str, Any]:
        """Per-rank detail of the incident, for the alert's fields and the status API."""
        first = next(iter(self.parts.values()))
        out: dict[str, Any] = {
            "first_rank": first.first_rank, "onset_step": first.onset_step,
            "signals": [p.label for p in self.parts.values()],
            "spiking_ranks": sorted(set().union(*(p.seen for p in self.parts.values()))),
            "value": first.value, "baseline": first.baseline, "ratio": first.ratio, "judged": first.how,
        }
        for p in self.parts.values():
            key = "loss" if p.label == "loss" else "grad_norm"
            out[f"{key}_ranks"] = sorted(p.seen)
            out[f"{key}_onset_step"] = p.onset_step
        if self.lr_change is not None:
            out["lr_change"] = {"before": self.lr_change.before, "after": self.lr_change.after,
                                "step": self.lr_change.step, "at_start": self.lr_change.at_start}
        return out

    def cause(self, before: int) -> str:
        """The LR change behind a rise that began at step ``before`` (named when it came first)."""
        change = self.lr_change
        if change is None or change.step > before:
            return ""
        return change.text()

    def rise(self) -> str:
        """ "loss and grad norm rose from step 3001 (ranks 0-7)" for the NaN's timeline; "" when no spike."""
        if not self.parts:
            return ""
        parts = sorted(self.parts.values(), key=lambda p: p.onset_step)
        names = " and ".join(p.label for p in parts)
        onset = parts[0].onset_step
        ranks = set().union(*(p.seen for p in parts))
        return f"{names} rose from step {onset} ({ranks_phrase(ranks)})"

    def reset_spikes(self) -> None:
        self.holder = None
        self.parts.clear()


def story_of(run: RunState) -> Story:
    """The run's story (made on first use)."""
    story = run.notes.get("divergence")
    if not isinstance(story, Story):
        story = run.notes["divergence"] = Story()
    return story
