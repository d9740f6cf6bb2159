"""What a detector says: an Event, turned into an alert transition by alerts.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Severity = Literal["critical", "warning", "info"]
State = Literal["firing", "resolved"]


@dataclass(slots=True)
class Event:
    """A detector's finding about one (alert, rank) of the run it watches.

    ``firing`` may be repeated while the condition holds (the alert book
    deduplicates); ``resolved`` closes an open alert and is ignored otherwise.
    ``rank`` is None for run-wide alerts. ``data`` carries the numbers behind
    the summary and is merged into the alert object. ``refresh`` (firing only): the
    open alert takes this event's summary, severity and data in place, as the picture
    of one incident sharpens (same fingerprint, not a new transition: nobody is paged
    again).
    """

    alert: str
    state: State
    rank: int | None
    step: int
    time: float
    summary: str = ""
    severity: Severity = "warning"
    data: dict[str, Any] = field(default_factory=dict)
    refresh: bool = False


def firing(alert: str, rank: int | None, step: int, time: float, summary: str,
           severity: Severity = "warning", **data: Any) -> Event:
    return Event(alert, "firing", rank, step, time, summary, severity, data)


def resolved(alert: str, rank: int | None, step: int, time: float, summary: str = "",
             **data: Any) -> Event:
    return Event(alert, "resolved", rank, step, time, summary, "info", data)
