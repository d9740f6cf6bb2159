"""What the client hears from the sidecar about its run: firing alerts, and the step to stop at.

The views come from two places, the answers to the client's own batches and the long poll of
``GET /v1/runs/{run}/watch``, in any order: a view older (by version) than the one held is ignored.
The stop step is the lowest one the sidecar fixed for an alert named in ``stop_on``; the sidecar
fixes each once and never lowers one below another (monitor/stop_steps.py), so every rank computes the
same number. Views are written by the client's threads and read by the training thread as whole
references (an attribute read: ``should_stop`` costs nothing).

A stop heard too late is not taken. ``should_stop(step)`` notes the step it was asked about, then reads
the stop; a new stop is set, then the noted step is read: if the loop already asked about that step,
the stop came too late for this rank, which then goes on (stopping at its own current step would leave
the others waiting in a collective) until the sidecar moves the stop ahead (it does when a rank reports
a step past it). The two orders make sure a stop is either seen by that check or known to be missed.

Every rank takes a stop, or none: the ack and the wait. Missing a stop alone is not enough: when one
rank hears stop S in time and leaves the loop after S while another heard it just after checking S
(a *partial* miss), the second one is already in step S+1's collectives and waits there for the first
forever. So the client acks each stop it adopts at once (``ack(step, checked)``, sent by the client in
an urgent heartbeat's ``stop_ack``): ``checked`` is the step noted when the stop was set, so the sidecar
knows whether this rank heard it in time. The sidecar marks the stop ``confirmed`` once every live rank
acked it in time, and moves it ahead at once when one acked it late (monitor/stop_steps.py). At the stop
step, ``should_stop`` answers yes only for a confirmed stop; until then the training thread waits
(``await_confirmed``, there and only there: a Condition the views wake) for the confirmation (stop),
for the stop to move past its step (go on, and meet the moved stop), or for ``stop_confirm_seconds``
(go on, log an error, and ack the stop as missed so that the sidecar moves it). A view without
``confirmed`` (an older sidecar) is taken as confirmed: no ack, no wait, the behaviour before acks.
The bound is a last resort (a rank that never acks: one without ``stop_on``, or cut off from the sidecar):
a confirmation crossing a rank's giving up would split the ranks again, so it is long next to the few
milliseconds a confirmation takes.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

log = logging.getLogger("trainhealth.trainer.client")

MAX_SEEN = 10_000


class Hearing:
    def __init__(self, run: str, stop_on: frozenset[str],
                 on_alert: Callable[[dict[str, Any]], Any] | None,
                 ack: Callable[[int, int | None], None] | None = None) -> None:
        """``ack(stop, checked)``: tell the sidecar at once that this rank heard ``stop`` when the loop had last
        asked about step ``checked`` (None: no step yet); called on a client thread, never under a lock."""
        self.run = run
        self.stop_on = stop_on
        self.on_alert = on_alert
        self.ack = ack
        self.version = -1  # -1: nothing heard yet (the long poll then answers at once)
        self.alerts: list[dict[str, Any]] = []
        self.stop_at: int | None = None
        self.confirmed_at: int | None = None  # stop_at once the sidecar confirmed it (every rank takes it)
        self.stop_reason: dict[str, Any] | None = None
        self.checked: int | None = None  # the last step should_stop was asked about (the training thread)
        self.missed: int | None = None  # a stop step heard after the loop had passed it
        self._acked: tuple[int, int | None] | None = None  # (stop, checked) this rank said about its last stop
        self._seen: set[tuple[Any, Any]] = set()  # (fingerprint, firing time): on_alert once per episode
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a view was taken: wakes await_confirmed

    def answer(self, answer: dict[str, Any]) -> None:
        """An ingest answer: its view of this run, if it has one."""
        runs = answer.get("runs")
        if isinstance(runs, dict):
            view = runs.get(self.run)
            if isinstance(view, dict):
                self.view(view)

    def view(self, view: dict[str, Any]) -> None:
        """{version, stops: {alert: {step, ...}}, alerts: [...]} (monitor/stop_steps.py)."""
        version = view.get("version")
        if type(version) is not int:
            return
        with self._lock:
            if version <= self.version:  # an older view overtaken by a newer one (answers race the long poll)
                return
            self.version = version
            stops = view.get("stops")
            stops = stops if isinstance(stops, dict) else {}
            alerts = [dict(a) for a in view.get("alerts") or () if isinstance(a, dict)]
            for alert in alerts:
                stop = stops.get(alert.get("alert"))
                if isinstance(stop, dict):
                    alert["stop_step"] = stop.get("step")
            self.alerts = alerts
            new = [a for a in alerts if (a.get("fingerprint"), a.get("time")) not in self._seen]
            if len(self._seen) > MAX_SEEN:
                self._seen.clear()
            self._seen.update((a.get("fingerprint"), a.get("time")) for a in new)
            was, missed_before = self.stop_at, self.missed
            chosen = self._decide(stops, alerts)
            stop = None if chosen is None else int(chosen["step"])
            acks = chosen is not None and "confirmed" in chosen  # a sidecar that confirms stops (not an older one)
            ack: tuple[int, int | None] | None = None
            if stop is not None and stop != was and stop != self.missed:
                self.stop_at = stop  # first the stop, then the step checked (see the docstring)
                checked = self.checked
                if checked is not None and checked >= stop:
                    self.stop_at, self.missed = None, stop
                if acks:
                    self._acked = ack = (stop, checked)
            elif acks and self._acked is not None and self._acked[0] == stop and chosen is not None \
                    and chosen["confirmed"] is not True:
                ack = self._acked  # not confirmed yet: said again (idempotent), in case the first was lost
            confirmed = chosen is not None and (not acks or chosen["confirmed"] is True)
            self.confirmed_at = stop if confirmed and self.stop_at == stop else None
            self._changed.notify_all()
        if ack is not None and self.ack is not None:
            self.ack(*ack)
        reason = self.stop_reason or {}
        if stop is not None and self.stop_at == stop and stop != was:
            log.warning("trainhealth: %s fired for run %s (rank %s, step %s): %s; every rank stops after step %d",
                        reason.get("alert"), self.run, reason.get("rank"), reason.get("first_step"),
                        reason.get("summary") or "", stop)
        elif stop is not None and self.missed == stop and missed_before != stop:
            log.error("trainhealth: %s: the stop at step %d came after this rank had passed it (step %s); it "
                      "goes on until the sidecar names a later one", reason.get("alert"), stop, self.checked)
        if self.on_alert is not None:
            for alert in new:
                try:
                    self.on_alert(alert)
                except Exception as exc:  # the user's callback must not stop the client
                    log.warning("trainhealth: on_alert(%s) raised %r", alert.get("alert"), exc)

    def _decide(self, stops: dict[str, Any], alerts: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The stop the view names for ``stop_on`` (the lowest step), and its reason; None: no stop."""
        chosen: dict[str, Any] | None = None
        for name, stop in stops.items():
            if name in self.stop_on and isinstance(stop, dict) and type(stop.get("step")) is int:
                if chosen is None or stop["step"] < chosen["step"]:
                    chosen = stop
        if chosen is None:
            self.stop_at, self.stop_reason, self.missed = None, None, None  # none yet, or the run restarted
            return None
        summary = next((a.get("summary") for a in alerts
                        if a.get("alert") == chosen.get("alert")
                        and a.get("rank") in (None, chosen.get("rank"))), None)  # None: a run-level incident
        self.stop_reason = {k: chosen.get(k) for k in ("alert", "step", "first_step", "rank", "severity")}
        self.stop_reason["summary"] = summary
        return chosen

    def await_confirmed(self, step: int, bound: float) -> bool:
        """The training thread at ``step``, at or past an unconfirmed stop: wait until the sidecar confirms it
        (True: stop), moves it past ``step`` or forgets it (False: go on), or ``bound`` seconds pass (False,
        an error logged, and the stop acked as missed so that the sidecar moves it for every rank)."""
        deadline = time.monotonic() + bound
        with self._changed:
            while True:
                stop = self.stop_at
                if stop is None or stop > step:
                    return False
                if self.confirmed_at == stop:
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            self.stop_at, self.missed, self._acked = None, stop, (stop, step)
        log.error("trainhealth: the stop at step %d was not confirmed by every rank of run %s within %gs "
                  "(stop_confirm_seconds); this rank goes on and tells the sidecar, which names a later stop",
                  stop, self.run, bound)
        if self.ack is not None:
            self.ack(stop, step)
        return False
