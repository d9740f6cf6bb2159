"""nan_divergence: the loss or the grad norm became NaN/Inf."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..events import Event, firing
from ..record import Record
from .base import Detector


@dataclass(kw_only=True, slots=True)
class NanDivergenceSettings:
    enabled: bool = True


class NanDivergence(Detector):
    name = "nan_divergence"
    Settings = NanDivergenceSettings

    def __init__(self, settings: NanDivergenceSettings, run) -> None:  # type: ignore[no-untyped-def]
        super().__init__(settings, run)
        self.first: tuple[int, int] | None = None  # (rank, step) of the first non-finite value

    def update(self, record: Record) -> list[Event]:
        if record.type != "sample" or not self.settings.enabled:
            return []
        bad = [
            (name, value)
            for name, value in (("loss", record.loss), ("grad_norm", record.grad_norm))
            if value is not None and not math.isfinite(value)
        ]
        if not bad:
            return []
        step = record.step if record.step is not None else -1
        if self.first is None:
            self.first = (record.rank, step)
        what = " and ".join(f"{n} became {v}" for n, v in bad)
        summary = f"{what} at step {step} on rank {record.rank}"
        first_rank, first_step = self.first
        if first_rank != record.rank:
            summary += f"; rank {first_rank} went non-finite first, at step {first_step}"
        return [
            firing(self.name, record.rank, step, record.time, summary, "critical",
                   first_rank=first_rank, first_step=first_step,
                   **{n: v for n, v in bad})
        ]
