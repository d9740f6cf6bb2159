"""Alert lifecycle: detector Events -> alert transitions (firing, resolved).

One open alert per (run, rank, alert name): repeated ``firing`` events while it
is open update it quietly (a ``refresh`` event also rewrites its summary, severity
and fields in place: one incident whose picture sharpens, paged once); ``resolved``
closes it; a later ``firing`` re-fires.
A transition is the alert object of DESIGN.md (a plain dict), the same one
replay prints, the API returns, the store keeps and webhooks post.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Iterable

from .events import Event

Alert = dict[str, Any]
Key = tuple[str, int | None, str]

RESERVED = {"alert", "state", "severity", "run", "rank", "step", "time", "summary", "started_at",
            "fingerprint"}


def fingerprint(key: Key) -> str:
    run, rank, name = key
    return f"{run}/{'-' if rank is None else rank}/{name}"


class AlertBook:
    """Open alerts and a bounded in-memory history of transitions."""

    def __init__(self, history: int = 10_000) -> None:
        self.open: dict[Key, Alert] = {}
        self.history: deque[Alert] = deque(maxlen=history)
        self.refreshed: dict[str, Alert] = {}  # fingerprint -> open alert rewritten in place, not yet saved

    def apply(self, run: str, events: Iterable[Event]) -> list[Alert]:
        out: list[Alert] = []
        for ev in events:
            key = (run, ev.rank, ev.alert)
            current = self.open.get(key)
            if ev.state == "firing":
                if current is not None:
                    current["last_step"] = ev.step
                    current["last_time"] = ev.time
                    if ev.refresh:
                        current["summary"] = ev.summary
                        current["severity"] = ev.severity
                        current.update((k, v) for k, v in ev.data.items() if k not in RESERVED)
                        self.refreshed[current["fingerprint"]] = current
                    continue
                alert = self._make(run, ev, ev.time)
                self.open[key] = alert
                out.append(alert)
            elif current is not None:
                del self.open[key]
                self.refreshed.pop(current["fingerprint"], None)
                alert = self._make(run, ev, current["time"])
                alert["severity"] = current["severity"]
                if not ev.summary:
                    alert["summary"] = f"resolved: {current['summary']}"
                out.append(alert)
        self.history.extend(out)
        return out

    @staticmethod
    def _make(run: str, ev: Event, started_at: float) -> Alert:
        alert: Alert = {
            "alert": ev.alert,
            "state": ev.state,
            "severity": ev.severity,
            "run": run,
            "rank": ev.rank,
            "step": ev.step,
            "time": ev.time,
            "summary": ev.summary,
            "started_at": started_at,
            "fingerprint": fingerprint((run, ev.rank, ev.alert)),
        }
        for k, v in ev.data.items():
            if k not in RESERVED:
                alert[k] = v
        return alert

    def restore(self, alert: Alert) -> None:
        """An alert that was open when the sidecar stopped (from the store): open again."""
        self.open[(alert["run"], alert["rank"], alert["alert"])] = alert

    def firing(self, run: str | None = None) -> list[Alert]:
        return [a for (r, _, _), a in self.open.items() if run is None or r == run]

    def query(self, run: str | None = None, state: str | None = None, alert: str | None = None,
              since: float | None = None, limit: int = 1000) -> list[Alert]:
        """Transitions, newest first. ``state=firing`` means alerts open now."""
        source: Iterable[Alert]
        if state == "firing":
            source = sorted(self.open.values(), key=lambda a: a["time"], reverse=True)
        else:
            source = reversed(self.history)
        out = []
        for a in source:
            if run is not None and a["run"] != run:
                continue
            if state is not None and a["state"] != state:
                continue
            if alert is not None and a["alert"] != alert:
                continue
            if since is not None and a["time"] < since:
                continue
            out.append(a)
            if len(out) >= limit:
                break
        return out
