"""Alert lifecycle: detector Events -> alert transitions (firing, resolved).

One open alert per (run, rank, alert name): repeated ``firing`` events while it
is open update it quietly (a ``refresh`` event also rewrites its summary, severity
and fields in place: one incident whose picture sharpens, paged once); ``resolved``
closes it; a later ``firing`` re-fires.
A transition is the alert object of docs/alerts.md (a plain dict, typed as ``Alert``),
the same one replay prints, the API returns, the store keeps and webhooks post.

The book is the one owner of open alerts: it assigns ids (from the sequence it is given: the
store's, in the server) and holds the open set; only it writes into its alert dicts. Everyone
else gets copies (``apply``, ``take_refreshed``, ``hand_off``, ``firing``, ``query``: what a caller
changes in them never reaches the book), or reads ``open`` (the book's own dicts, for the few readers
that only count or look: the exporter, the checkpoint). docs/code-structure.md, "Alerts".
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Iterable, TypedDict, cast

from .events import Event, Severity, State


class AlertFields(TypedDict):
    """What every alert transition carries (docs/alerts.md), set by ``AlertBook``."""

    alert: str  # the alert name: nan_divergence, rank_stalled, ...
    state: State  # "firing" | "resolved"
    severity: Severity  # "critical" | "warning" | "info"; a resolved transition keeps its firing's
    run: str
    rank: int | None  # None: a run-wide alert
    step: int
    time: float  # record time of the transition
    summary: str  # one sentence a person can act on
    started_at: float  # record time of the firing this transition belongs to
    fingerprint: str  # "run/rank/alert" ("-" for no rank): one per (run, rank, alert)


class Alert(AlertFields, total=False):
    """An alert transition: the fields above, then the ones set later in its life (below), then the
    detector's own fields (``Event.data``: ``first_rank``, ``rate_bytes_per_second``, ...), which the
    type does not list: read them with ``extra(alert)``. At run time an Alert is a plain dict, so code
    that reads it as ``dict[str, Any]`` keeps working.
    """

    last_step: int  # an open alert: step and time of its latest repeated firing event (AlertBook)
    last_time: float
    id: int  # the transition's id: assigned by the AlertBook when it makes the transition (the store's sequence)
    silenced: bool  # read back from the store: not notified, a silence matched when it fired
    acknowledged: bool  # read back from the store: its episode was acknowledged ...
    acknowledged_at: float  # ... when, by whom, why
    acknowledged_by: str | None
    acknowledged_comment: str | None
    delivery: list[Delivery]  # read back from the store: what became of its notification, per target
    refreshed: bool  # a line of ``trainhealth replay`` (pipeline.replay(refreshes=True)): not a transition, the
    # open alert as it stands after a refresh in place (the store's body of it then); never set on a transition


class Delivery(TypedDict):
    """One target's delivery of an alert's notification (GET /v1/alerts)."""

    target: str  # the target's name (its key in the store until named by the sink)
    state: str  # "pending", "delivered" or "undelivered"
    error: str | None  # why, for an undelivered notification
    updated: float | None  # when the state last changed


def extra(alert: Alert) -> dict[str, Any]:
    """The alert as a plain dict: for the detector's own fields, which ``Alert`` does not name."""
    return cast("dict[str, Any]", alert)


Key = tuple[str, int | None, str]

RESERVED = frozenset(AlertFields.__annotations__)  # a detector's Event.data never overwrites these
INCIDENT_ROOT = ("first_rank", "first_step", "root_ranks", "host")  # what a run-level incident was about


def fingerprint(key: Key) -> str:
    run, rank, name = key
    return f"{run}/{'-' if rank is None else rank}/{name}"


def copied(alert: Alert) -> Alert:
    """A copy nobody else holds: its lists and dicts (a detector's ``root_ranks``, ...) copied too."""
    return cast("Alert", {k: _data_copy(v) if isinstance(v, (list, dict)) else v for k, v in alert.items()})


def _data_copy(value: Any) -> Any:
    """A deep copy of an alert's data (lists, dicts and tuples of scalars, nested): 2-4x faster than
    ``copy.deepcopy`` (no memo, no dispatch), which ``firing()`` and ``query()`` pay per alert they give."""
    if isinstance(value, list):
        return [_data_copy(v) if isinstance(v, (list, dict, tuple)) else v for v in value]
    if isinstance(value, dict):
        return {k: _data_copy(v) if isinstance(v, (list, dict, tuple)) else v for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_data_copy(v) if isinstance(v, (list, dict, tuple)) else v for v in value)
    return value


def _episode(alert: Alert) -> tuple[str, float]:
    return alert["fingerprint"], alert["started_at"]


class AlertBook:
    """Open alerts and a bounded in-memory history of transitions: the one owner of both.

    ``ids``: where transition ids come from (the server: the store's sequence, which never hands an id out
    twice, across restarts too); None (replay, tests): transitions carry no id."""

    def __init__(self, history: int = 10_000, ids: Callable[[], int] | None = None) -> None:
        self.ids = ids
        self.open: dict[Key, Alert] = {}  # the book's own dicts: read them, never write them outside the book
        self.history: deque[Alert] = deque(maxlen=history)  # a firing's entry is its open alert (refreshed)
        self.refreshed: dict[str, Alert] = {}  # fingerprint -> open alert rewritten in place, not yet taken
        self.closed: set[Key] = set()  # alerts closed by ``close`` whose detector may still think them open

    def close(self, run: str, events: Iterable[Event]) -> list[Alert]:
        """Resolve open alerts from outside their detector (the pipeline: the run ended, a reload disabled
        the detector). The detector still thinks them open: its refreshes are dropped until it fires anew."""
        events = list(events)
        self.closed.update((run, ev.rank, ev.alert) for ev in events)
        if len(self.closed) > 100_000:  # bounded: forgetting only lets a late refresh open the alert again
            self.closed.clear()
        return self.apply(run, events)

    def take_refreshed(self) -> list[Alert]:
        """Copies of the open alerts rewritten in place since the last call, as they stand now."""
        out = [copied(a) for a in self.refreshed.values()]
        self.refreshed.clear()
        return out

    def current(self, alerts: list[Alert]) -> list[Alert]:
        """These transitions (one batch's, as ``apply`` returned them), each firing that was refreshed after
        it was made replaced by a new copy of its alert as it stands now: a batch's transitions show the
        picture at its end. The given dicts are not changed."""
        if not self.refreshed:
            return alerts
        out = []
        for a in alerts:
            now = self.refreshed.get(a["fingerprint"]) if a["state"] == "firing" else None
            out.append(copied(now) if now is not None and _episode(now) == _episode(a) else a)
        return out

    def latest(self, alerts: Iterable[Alert]) -> list[Alert]:
        """These transitions (yielded earlier, e.g. by a replay), each firing replaced by a copy of its alert as
        the book holds it now: refreshed since (a root named, a rise joined), resolved or still open; as
        given when the book's bounded history no longer holds it. The given dicts are not changed."""
        now = {_episode(a): a for a in self.history if a["state"] == "firing"}
        now.update((_episode(a), a) for a in self.open.values())
        out = []
        for a in alerts:
            held = now.get(_episode(a)) if a["state"] == "firing" else None
            out.append(copied(held) if held is not None else a)
        return out

    def hand_off(self, alerts: list[Alert]) -> tuple[list[Alert], list[Alert]]:
        """What goes to the sinks after a batch (or tick): its transitions as they stand now (``current``),
        and copies of the open alerts refreshed since the last hand-off that did not fire in this batch (a
        firing refreshed in its own batch goes out once, with its latest picture, not also as a refresh)."""
        if not self.refreshed:  # the common case: nothing rewritten in place since the last hand-off
            return alerts, []
        alerts = self.current(alerts)
        fired = {_episode(a) for a in alerts if a["state"] == "firing"}
        refreshed = [a for a in self.take_refreshed() if _episode(a) not in fired]
        return alerts, refreshed

    def apply(self, run: str, events: Iterable[Event]) -> list[Alert]:
        """The transitions these events make, as copies (the caller's to keep: the book's own open alert
        may be refreshed in place later, the copy is not)."""
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
                        extra(current).update((k, v) for k, v in ev.data.items() if k not in RESERVED)
                        self.refreshed[current["fingerprint"]] = current
                    continue
                if ev.refresh and key in self.closed:  # closed from outside its detector (the run ended, a
                    continue  # reload disabled it): a refresh of that incident does not open it again
                self.closed.discard(key)
                alert = self._make(run, ev, ev.time)
                self.open[key] = alert
                out.append(self._identify(alert))
            elif current is not None:
                del self.open[key]  # a refresh not yet taken stays: the sinks store the firing's final picture
                alert = self._make(run, ev, current["time"])
                alert["severity"] = current["severity"]
                if current["rank"] is None:  # a run-level incident: its resolve still names its root
                    fields, was = extra(alert), extra(current)
                    for k in INCIDENT_ROOT:
                        if k in was:
                            fields.setdefault(k, was[k])
                if not ev.summary:
                    alert["summary"] = f"resolved: {current['summary']}"
                out.append(self._identify(alert))
        self.history.extend(out)
        return [copied(a) for a in out]

    def _identify(self, alert: Alert) -> Alert:
        """Its id, once, when the transition is made (last in the dict, as stored and posted)."""
        if self.ids is not None:
            alert["id"] = self.ids()
        return alert

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
        fields = extra(alert)
        for k, v in ev.data.items():
            if k not in RESERVED:
                fields[k] = v
        return alert

    def restore(self, alert: Alert) -> None:
        """An alert that was open when the sidecar stopped (from the store): open again, as a copy of the
        book's own, with the id it was stored under."""
        self.open[(alert["run"], alert["rank"], alert["alert"])] = copied(alert)

    def firing(self, run: str | None = None) -> list[Alert]:
        """Copies of the open alerts (of ``run``). Copies: the page and the status routes hand them to a
        worker thread or keep them while the book refreshes its own in place."""
        return [copied(a) for (r, _, _), a in self.open.items() if run is None or r == run]

    def query(self, run: str | None = None, state: str | None = None, alert: str | None = None,
              since: float | None = None, limit: int = 1000) -> list[Alert]:
        """Copies of transitions, newest first. ``state=firing`` means alerts open now."""
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
            out.append(copied(a))
            if len(out) >= limit:
                break
        return out
