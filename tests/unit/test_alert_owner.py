"""One owner of open alerts (docs/code-structure.md, "Alerts"): the AlertBook assigns ids and holds the open set;
callers and sinks get copies; every call a sink receives is in service.AlertSink.

The incident used throughout: rank 1's loss goes NaN at step 30 (nan_divergence fires, rank 1 its root), then
rank 0's own NaN at the same step arrives (the open alert is refreshed in place: rank 0 becomes the root).
"""

from __future__ import annotations

import inspect
import itertools
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from trainhealth.alerts import AlertBook
from trainhealth.assembly import build_service
from trainhealth.config import ServerSettings, Settings, load
from trainhealth.events import firing, resolved
from trainhealth.notify.console import ConsoleLog
from trainhealth.notify.sink import AlertsOut
from trainhealth.service import AlertSink, Service

from .traces import SentAlerts

HEALTHY = [{"run": "r", "rank": q, "time": 1000.0 + s, "step": s, "loss": 1.0, "grad_norm": 1.0}
           for s in range(1, 30) for q in (0, 1)]
RANK1_NAN = {"run": "r", "rank": 1, "time": 1030.0, "step": 30, "loss": "NaN"}
RANK0_NAN = {"run": "r", "rank": 0, "time": 1030.1, "step": 30, "loss": "NaN"}
RESTART0 = {"type": "start", "run": "r", "rank": 0, "time": 1031.0, "world_size": 2}  # after RANK0_NAN in a batch


def ingest(service: Service, *records: dict[str, Any]) -> dict[str, Any]:
    answer = service.ingest(json.dumps(list(records)).encode(), "application/json")
    assert answer.status == 200, answer.body
    return answer.body


class Vandal(SentAlerts):
    """A sink that writes into everything it is handed (as the store once wrote ids into the book's dicts)."""

    def __call__(self, alerts: list[Any]) -> None:
        super().__call__(alerts)
        for a in alerts:
            a["summary"], a["id"] = "overwritten", -1
            a.setdefault("received_ranks", []).append(99)

    def refresh(self, alerts: list[Any]) -> None:
        self.__call__(alerts)


def test_a_transition_the_book_returned_is_not_changed_by_a_later_refresh() -> None:
    book = AlertBook(ids=itertools.count(1).__next__)
    [fired] = book.apply("r", [firing("x", None, 30, 1030.0, "rank 1 diverged", "critical", first_rank=1,
                                      ranks=[1])])
    book.apply("r", [replace(firing("x", None, 30, 1030.1, "rank 0 diverged first", "critical",
                                    first_rank=0, ranks=[0, 1]), refresh=True)])
    assert (fired["summary"], fired["first_rank"], fired["ranks"], fired["id"]) == ("rank 1 diverged", 1, [1], 1)
    held = book.open[("r", None, "x")]
    assert (held["summary"], held["first_rank"], held["ranks"], held["id"]) == ("rank 0 diverged first", 0, [0, 1], 1)
    # the batch's hand-off: the firing with its picture at the batch's end, a new dict; no separate refresh
    [sent], refreshed = book.hand_off([fired])
    assert sent is not fired and sent is not held and refreshed == []
    assert (sent["summary"], sent["first_rank"], sent["id"]) == ("rank 0 diverged first", 0, 1)
    assert fired["summary"] == "rank 1 diverged"
    # the resolve: its own id, from the same sequence
    [closed] = book.apply("r", [resolved("x", None, 31, 1031.0)])
    assert (closed["state"], closed["id"], closed["first_rank"]) == ("resolved", 2, 0)


def test_latest_gives_a_yielded_firing_as_its_alert_ended_up_refreshed_and_resolved() -> None:
    """What the report draws after a replay: each firing with the text it was refreshed to (one text
    everywhere), also once resolved; another episode of the same alert keeps its own picture."""
    book = AlertBook()
    [first] = book.apply("r", [firing("x", None, 30, 1030.0, "rank 1 diverged", "critical", first_rank=1)])
    book.apply("r", [replace(firing("x", None, 30, 1030.1, "rank 0 diverged first", "critical", first_rank=0),
                             refresh=True)])
    [closed] = book.apply("r", [resolved("x", None, 31, 1031.0)])
    [second] = book.apply("r", [firing("x", None, 40, 1040.0, "again", "warning")])
    now = book.latest([first, closed, second])
    assert [(a["state"], a["summary"]) for a in now] == [
        ("firing", "rank 0 diverged first"), ("resolved", closed["summary"]), ("firing", "again")]
    assert now[0] is not book.history[0] and first["summary"] == "rank 1 diverged"  # copies; the given unchanged
    assert AlertBook().latest([first]) == [first]  # a book that never held it: as given


def test_what_a_caller_changes_in_a_returned_transition_does_not_reach_the_book() -> None:
    book = AlertBook()
    [fired] = book.apply("r", [firing("x", 2, 5, 10.0, "bad", "critical", ranks=[2])])
    fired["summary"] = "changed"
    fired["ranks"].append(7)
    held = book.open[("r", 2, "x")]
    assert (held["summary"], held["ranks"]) == ("bad", [2])
    assert "id" not in held  # no id sequence given (replay, tests): transitions carry no id
    restored = {**held, "id": 41}
    book.restore(restored)  # the book keeps a copy of what it is given back
    restored["summary"] = "changed"
    assert book.open[("r", 2, "x")]["summary"] == "bad"


def test_what_a_caller_changes_in_the_open_alerts_or_the_history_it_read_does_not_reach_the_book() -> None:
    """``firing()`` and ``query()`` (the status routes, the page) hand out copies, nested lists included."""
    book = AlertBook()
    book.apply("r", [firing("x", 2, 5, 10.0, "bad", "critical", ranks=[2])])
    book.apply("r", [firing("y", None, 6, 11.0, "worse", "warning", root_ranks=[0, 1])])
    book.apply("r", [resolved("y", None, 7, 12.0)])
    read = [*book.firing("r"), *book.firing(), *book.query(), *book.query(state="firing"), *book.query(run="r")]
    assert len(read) == 1 + 1 + 3 + 1 + 3
    for a in read:
        a["summary"] = "changed"
        a.setdefault("ranks", []).append(7)
        a.setdefault("root_ranks", []).append(7)
    assert [(a["alert"], a["summary"], a.get("ranks"), a.get("root_ranks")) for a in book.query()] == [
        ("y", "resolved: worse", None, [0, 1]), ("y", "worse", None, [0, 1]), ("x", "bad", [2], None)]
    assert [(a["summary"], a["ranks"]) for a in book.firing("r")] == [("bad", [2])]
    held = book.open[("r", 2, "x")]
    assert (held["summary"], held["ranks"]) == ("bad", [2])


def test_a_caller_holding_a_batchs_firing_sees_it_unchanged_after_a_refresh_in_a_later_batch() -> None:
    sink = SentAlerts()
    service = Service(load(), clock=lambda: 5000.0, alert_sinks=[sink])
    ingest(service, *HEALTHY)
    ingest(service, RANK1_NAN)
    [fired] = sink.sent
    ingest(service, RANK0_NAN)
    assert fired["first_rank"] == 1 and "on rank 1" in fired["summary"]  # as it was handed over
    [now] = service.book.firing("r")
    assert now["first_rank"] == 0 and now["summary"] != fired["summary"]
    [refreshed] = sink.refreshed  # the sharpened picture came as a refresh, a new dict
    assert refreshed is not now and refreshed == now


def test_a_firing_refreshed_in_its_own_batch_goes_out_once_with_the_batchs_final_picture() -> None:
    sink = SentAlerts()
    service = Service(load(), clock=lambda: 5000.0, alert_sinks=[sink])
    ingest(service, *HEALTHY)
    ingest(service, RANK1_NAN, RANK0_NAN)
    [fired] = sink.sent
    assert fired["state"] == "firing" and fired["first_rank"] == 0 and sink.refreshed == []


def test_a_sink_that_changes_what_it_receives_changes_neither_the_book_nor_the_other_sinks() -> None:
    vandal, witness = Vandal(), SentAlerts()
    service = Service(load(), clock=lambda: 5000.0, alert_sinks=[vandal, witness],
                      alert_ids=itertools.count(7).__next__)
    ingest(service, *HEALTHY)
    ingest(service, RANK1_NAN)
    ingest(service, RANK0_NAN)  # a refresh, to both sinks
    [held] = service.book.firing("r")
    assert (held["id"], held["first_rank"]) == (7, 0) and held["summary"] != "overwritten"
    assert 99 not in held.get("received_ranks", [])
    [fired], [refreshed] = witness.sent, witness.refreshed
    assert (fired["id"], fired["first_rank"], refreshed["id"], refreshed["first_rank"]) == (7, 1, 7, 0)
    assert "overwritten" not in (fired["summary"], refreshed["summary"])
    assert [a["id"] for a in vandal.sent] == [-1, -1]  # it changed its own copies only
    assert service.stop_steps.view("r")["alerts"][0]["summary"] == held["summary"]


def test_refresh_reaches_every_sink_through_the_protocol_before_the_batchs_resolve(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", "trainhealth.alerts")
    calls: list[tuple[str, str]] = []

    class Ordered(SentAlerts):
        def __call__(self, alerts: list[Any]) -> None:
            calls.extend(("transition", a["state"]) for a in alerts)

        def refresh(self, alerts: list[Any]) -> None:
            calls.extend(("refresh", a["state"]) for a in alerts)

    service = Service(load(), clock=lambda: 5000.0, alert_sinks=[ConsoleLog(), Ordered()])
    ingest(service, *HEALTHY)
    ingest(service, RANK1_NAN)
    # rank 0's NaN refreshes the incident, and then its start (a restart) resolves it, in one batch
    ingest(service, RANK0_NAN, RESTART0)
    assert calls == [("transition", "firing"), ("refresh", "firing"), ("transition", "resolved")]
    updated = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ALERT updated")]
    assert len(updated) == 1 and "on ranks 0-1" in updated[0]
    assert service.book.firing("r") == []


def test_every_sink_class_implements_every_call_of_the_protocol() -> None:
    calls = {name for name, _ in inspect.getmembers(AlertSink, inspect.isfunction) if not name.startswith("_")}
    assert calls == {"refresh"}  # and __call__
    for cls in (ConsoleLog, AlertsOut, SentAlerts):
        for name in calls | {"__call__"}:
            assert inspect.signature(getattr(cls, name)).parameters.keys() == {"self", "alerts"}, (cls, name)


def test_the_store_sink_refuses_a_transition_without_the_books_id(tmp_path: Path) -> None:
    service, out = build_service(Settings(server=ServerSettings(db=str(tmp_path / "a.db"))))
    try:
        unnumbered = AlertBook().apply("r", [firing("x", 0, 1, 1.0, "bad", "critical")])
        with pytest.raises(ValueError, match="without an id"):
            out(unnumbered)
        assert out.store.query_alerts()["alerts"] == [] and out.open == {}
    finally:
        service.close()


def test_ids_are_the_books_kept_across_a_restart_and_a_refresh_rewrites_the_stored_body(tmp_path: Path) -> None:
    settings = Settings(server=ServerSettings(db=str(tmp_path / "a.db"), alertmanager="http://127.0.0.1:9"))
    # keep_state: the detectors' state survives the restart (as the server's does)
    service, out = build_service(settings, clock=lambda: 5000.0, keep_state=True)
    ingest(service, *HEALTHY)
    ingest(service, RANK1_NAN)
    [held] = service.book.firing("r")
    [stored] = out.store.query_alerts()["alerts"]
    assert held["id"] == stored["id"] == 1
    service.close()

    # a restart: the store's open alert comes back
    service, out = build_service(settings, clock=lambda: 5000.0, keep_state=True)
    try:
        [back] = service.book.firing("r")
        assert back["id"] == 1 and back is not out.open[back["fingerprint"]].alert
        ingest(service, RANK0_NAN)  # a refresh of the restored alert: same id, body rewritten
        [stored] = out.store.query_alerts()["alerts"]
        assert (stored["id"], stored["first_rank"]) == (1, 0)
        assert [(a["id"], a["first_rank"]) for a in out.notified_open()] == [(1, 0)]  # Alertmanager's re-send
        ingest(service, RESTART0)
        latest = out.store.query_alerts()["alerts"]
        assert [a["state"] for a in latest] == ["resolved", "firing"] and latest[1]["id"] == 1
        assert latest[0]["id"] > 1  # the store's sequence: never an id handed out before the restart
        assert out.store.query_alerts(state="firing")["alerts"] == [] and service.book.firing("r") == []
    finally:
        service.close()
