"""Fakes shared by the trainer client tests."""

from __future__ import annotations

from trainhealth.trainer.transport import Result

ENV = {"RANK": "3", "WORLD_SIZE": "4", "TORCHELASTIC_RUN_ID": "elastic-run"}


class FakeSender:
    def __init__(self, outcomes: list[Result] | None = None) -> None:
        self.outcomes = list(outcomes or [])
        self.batches: list[list[dict]] = []  # delivered
        self.attempts = 0
        self.ids: list[str | None] = []  # the batch id of every attempt

    def send(self, records, batch_id=None):
        self.attempts += 1
        self.ids.append(batch_id)
        result = self.outcomes.pop(0) if self.outcomes else Result("ok")
        if result.outcome == "ok":
            self.batches.append([dict(r) for r in records])
        return result

    def close(self):
        pass

    @property
    def records(self) -> list[dict]:
        return [r for b in self.batches for r in b]


class Clock:
    """A clock a test sets: ``clock.now = ...``."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
