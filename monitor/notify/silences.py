"""Silences: "do not notify about this run (alert, rank) until then", as users know from Alertmanager.

A silenced alert is still stored and listed (``silenced: true``); it is not
posted to webhooks or pushed to Alertmanager. A silence matters when an alert
fires: an alert already notified keeps its lifecycle (its resolve is sent), and
an alert still open when its silence ends is notified then.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

from ..alerts import Alert
from ..record import RUN_PATTERN

MAX_SILENCE_SECONDS = 366 * 86400.0
MAX_COMMENT = 1000


class SilenceError(ValueError):
    """A bad silence; the message names the field and the value."""


@dataclass(kw_only=True, slots=True)
class Silence:
    run: str
    alert: str | None = None  # None: every alert of the run
    rank: int | None = None  # None: every rank
    until: float  # unix seconds
    comment: str = ""
    created_by: str | None = None
    id: int = 0
    created: float = 0.0

    def matches(self, alert: Alert, now: float) -> bool:
        return (now < self.until and alert["run"] == self.run
                and (self.alert is None or alert["alert"] == self.alert)
                and (self.rank is None or alert["rank"] == self.rank))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


MAX_RANK = 2**31 - 1  # as a record's rank


def parse(obj: Any, now: float) -> Silence:
    """A silence from a request body; raises SilenceError naming the bad field."""
    if not isinstance(obj, dict):
        raise SilenceError(f"body: must be a JSON object, got {type(obj).__name__}")
    known = {"run", "alert", "rank", "until", "comment", "created_by"}
    for key in obj:
        if key not in known:
            raise SilenceError(f"{key}: unknown field (known: {', '.join(sorted(known))})")
    run = obj.get("run")
    if not isinstance(run, str) or not re.match(RUN_PATTERN, run):
        raise SilenceError(f"run: must be a run name (1-128 of [A-Za-z0-9._:-]), got {run!r}")
    alert = obj.get("alert")
    if alert is not None and (not isinstance(alert, str) or not 0 < len(alert) <= 128):
        raise SilenceError(f"alert: must be an alert name or null, got {alert!r}")
    rank = obj.get("rank")
    if isinstance(rank, float) and rank.is_integer():  # 3.0 is the integer 3 in JSON (and JSON Schema)
        rank = int(rank)
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank <= MAX_RANK):
        raise SilenceError(f"rank: must be an integer 0-{MAX_RANK} or null, got {rank!r}")
    until = obj.get("until")
    if not isinstance(until, (int, float)) or isinstance(until, bool) or not math.isfinite(until):
        raise SilenceError(f"until: must be unix seconds, got {until!r}")
    if not now < until <= now + MAX_SILENCE_SECONDS:
        raise SilenceError(f"until: must be in the future and within 366 days, got {until!r} (now {now:.0f})")
    for key, limit in (("comment", MAX_COMMENT), ("created_by", 128)):
        value = obj.get(key)
        if value is not None and (not isinstance(value, str) or len(value) > limit):
            raise SilenceError(f"{key}: must be a string of at most {limit} chars, got {value!r:.80}")
    return Silence(run=run, alert=alert, rank=rank, until=float(until), comment=obj.get("comment") or "",
                   created_by=obj.get("created_by"))
