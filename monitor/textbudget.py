"""One budget for the long text the runs keep: each rank's last OOM ``detail`` (up to 1 MiB, the
allocator's summary) and each start record's ``config``. 200 ranks could otherwise hold 500 MB.

All runs together keep at most ``limits.max_text_bytes`` of it (UTF-8, a config as JSON). Past that,
the oldest kept text is replaced by a short note saying so, until the newest fits: the latest OOM of each
rank is the one worth reading. docs/operations.md ("Bounds") states the figure.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import msgspec

from .record import Record
from .state import RunState

NOTE = ("dropped: the sidecar keeps at most {limit} bytes of OOM details and start configs for all runs "
        "together (limits.max_text_bytes), the newest first")


class TextBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._held: deque[tuple[int, Any]] = deque()  # (bytes, its holder: a last_oom dict or a start Record)

    def hold(self, holder: dict[str, Any] | Record) -> None:
        """Count the text ``holder`` keeps; drop the oldest held text while over the budget."""
        size = _size(holder)
        if not size:
            return
        self._held.append((size, holder))
        self.used += size
        while self.used > self.limit and self._held:
            size, old = self._held.popleft()
            self.used -= size
            note = NOTE.format(limit=self.limit)
            if isinstance(old, Record):
                old.config = {"trainhealth": note}
            else:
                old["detail"] = note

    def rebuild(self, runs: dict[str, RunState]) -> None:
        """After a restore: count what the restored runs keep, oldest first."""
        self._held.clear()
        self.used = 0
        holders: list[tuple[float, Any]] = []
        for run in runs.values():
            holders += [(s.time, s) for s in run.starts if s.config]
            holders += [(r.last_oom["time"], r.last_oom) for r in run.ranks.values() if r.last_oom]
        for _, holder in sorted(holders, key=lambda h: h[0]):
            self.hold(holder)


def _size(holder: dict[str, Any] | Record) -> int:
    if isinstance(holder, Record):
        return len(msgspec.json.encode(holder.config)) if holder.config else 0
    detail = holder.get("detail")
    return len(detail.encode("utf-8", "replace")) if isinstance(detail, str) else 0
