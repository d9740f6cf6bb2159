"""The step a run-level event is stamped with."""

from __future__ import annotations

from ...record import Record
from ...state import RunState


def step_of(record: Record, run: RunState) -> int:
    """The record's step, or for a start (no step) its rank's last step (0 before any)."""
    if record.step is not None:
        return record.step
    rank = run.ranks.get(record.rank)
    return max(0, rank.last_step) if rank is not None else 0
