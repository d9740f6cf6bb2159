"""Alerts out without HTTP: what is stored, what is queued for which target, silences, restart, acks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

import pytest
from trainhealth.assembly import build_service
from trainhealth.config import Limits, ServerSettings, Settings
from trainhealth.notify.silences import SilenceError, parse
from trainhealth.notify.sink import AlertsOut
from trainhealth.service import Service

HOOK = "http://127.0.0.1:9/hook"


class Clock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


Start = Callable[..., tuple[Service, AlertsOut]]


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Start]:
    """start(clock, ttl=, alertmanager=): a Service wired like the server's. The db path is the same
    each call, so a second call is a restart (the previous service is closed first)."""
    opened: list[Service] = []

    def make(clock: Clock, ttl: float = 600.0, alertmanager: str | None = None) -> tuple[Service, AlertsOut]:
        for old in opened:
            old.close()
        opened.clear()
        settings = Settings(server=ServerSettings(db=str(tmp_path / "t.db"), webhooks=[HOOK],
                                                  alertmanager=alertmanager),
                            limits=Limits(run_ttl_seconds=ttl))
        service, out = build_service(settings, clock=clock)
        opened.append(service)
        return service, out

    yield make
    for old in opened:
        old.close()


def ingest(service: Service, *records: dict) -> dict:
    answer = service.ingest(json.dumps(list(records)).encode(), "application/json")
    assert answer.status == 200, answer.body
    return answer.body


def nan(run: str, rank: int, t: float, step: int = 10) -> dict:
    return {"run": run, "rank": rank, "time": t, "step": step, "loss": float("nan")}


def oom(run: str, rank: int, t: float, step: int = 10) -> dict:
    """A per-rank alert (gpu_oom): nan_divergence is one alert per run (rank null)."""
    return {"type": "oom", "run": run, "rank": rank, "time": t, "step": step, "message": "CUDA out of memory"}


def queued(out: AlertsOut) -> list[tuple[str, str, str, int | None]]:
    """(target kind, alert, state, rank) of every queued notification, oldest first."""
    rows = out.store.db.execute("SELECT target, payload FROM outbox ORDER BY id").fetchall()
    return [(target.split()[0], a["alert"], a["state"], a["rank"])
            for target, payload in rows for a in json.loads(payload)]


def test_transition_is_stored_and_queued_for_every_target(start: Start) -> None:
    clock = Clock()
    service, out = start(clock, alertmanager="http://127.0.0.1:9")
    assert ingest(service, nan("r1", 0, clock.t))["alerts"] == 1
    stored = out.store.query_alerts()["alerts"]
    assert [(a["id"], a["state"], a["loss"]) for a in stored] == [(1, "firing", "NaN")]
    assert queued(out) == [("webhook", "nan_divergence", "firing", None),
                           ("alertmanager", "nan_divergence", "firing", None)]
    assert out.delivery_stats()["outbox_depth"] == 2
    assert service.book.firing("r1")[0]["id"] == 1  # the live alert carries its id (for acks)


def test_silenced_alert_is_stored_but_neither_it_nor_its_resolve_is_notified(start: Start) -> None:
    clock = Clock()
    service, out = start(clock, ttl=60)
    out.add_silence({"run": "r1", "alert": "nan_divergence", "until": clock.t + 3600, "comment": "known"})
    ingest(service, nan("r1", 0, clock.t), nan("r2", 0, clock.t))
    assert queued(out) == [("webhook", "nan_divergence", "firing", None)]
    assert json.loads(out.store.db.execute("SELECT payload FROM outbox").fetchone()[0])[0]["run"] == "r2"
    by_run = {a["run"]: a for a in out.store.query_alerts()["alerts"]}
    assert by_run["r1"]["silenced"] is True and by_run["r2"]["silenced"] is False
    clock.t += 61
    resolves = service.tick()  # both runs expire: their alerts resolve
    assert sorted((a["run"], a["state"]) for a in resolves) == [("r1", "resolved"), ("r2", "resolved")]
    assert [q[2] for q in queued(out)] == ["firing", "resolved"]  # r2 only
    assert out.store.query_alerts(state="firing")["alerts"] == []


def test_silence_matches_only_its_run_alert_and_rank(start: Start) -> None:
    clock = Clock()
    service, out = start(clock)
    out.add_silence({"run": "r1", "rank": 1, "until": clock.t + 60})
    ingest(service, oom("r1", 0, clock.t), oom("r1", 1, clock.t), oom("r1x", 1, clock.t))
    assert sorted((a["run"], a["rank"], a["silenced"]) for a in out.store.query_alerts()["alerts"]) == [
        ("r1", 0, False), ("r1", 1, True), ("r1x", 1, False)]


def test_alert_still_open_when_its_silence_ends_is_notified_then(start: Start) -> None:
    clock = Clock()
    service, out = start(clock)
    s = out.add_silence({"run": "r1", "until": clock.t + 30})
    ingest(service, nan("r1", 0, clock.t))
    out.tick(clock.t + 10)
    assert queued(out) == []
    clock.t += 31
    out.tick(clock.t)
    assert queued(out) == [("webhook", "nan_divergence", "firing", None)]
    assert out.store.query_alerts()["alerts"][0]["silenced"] is False
    assert out.list_silences() == [] and out.list_silences(expired=True)[0]["id"] == s["id"]


def test_deleting_a_silence_ends_it_now(start: Start) -> None:
    clock = Clock()
    service, out = start(clock)
    s = out.add_silence({"run": "r1", "until": clock.t + 3600})
    ingest(service, nan("r1", 0, clock.t))
    assert out.expire_silence(s["id"]) is True
    out.tick(clock.t)
    assert queued(out) == [("webhook", "nan_divergence", "firing", None)]
    assert out.expire_silence(999) is False


def test_restart_restores_open_alerts_so_they_stay_deduplicated_and_resolve(start: Start) -> None:
    clock = Clock()
    service, out = start(clock, ttl=60)
    ingest(service, oom("r1", 0, clock.t), oom("r1", 1, clock.t))

    service, out = start(clock, ttl=60)  # same db: a restart
    assert sorted(a["rank"] for a in service.book.firing("r1")) == [0, 1]
    clock.t += 5
    assert ingest(service, oom("r1", 0, clock.t, step=11))["alerts"] == 0  # still open: deduplicated
    clock.t += 61
    resolves = service.tick()
    assert sorted((a["rank"], a["state"]) for a in resolves) == [(0, "resolved"), (1, "resolved")]
    assert out.store.query_alerts(state="firing")["alerts"] == []
    episodes = out.store.db.execute("SELECT episode FROM alerts WHERE state = 'resolved' ORDER BY rank")
    assert [e for (e,) in episodes] == [1, 2]  # each resolve closes the episode raised before the restart


def test_restored_alert_of_a_run_that_never_returns_resolves_after_the_run_ttl(start: Start) -> None:
    clock = Clock()
    service, out = start(clock, ttl=60)
    ingest(service, nan("gone", 0, clock.t))
    clock.t += 30
    service, out = start(clock, ttl=60)
    clock.t += 29
    service.tick()  # 59 s since the run was last seen: still open
    assert [a["state"] for a in out.store.query_alerts()["alerts"]] == ["firing"]
    clock.t += 2
    service.tick()
    latest = out.store.query_alerts()["alerts"][0]
    assert (latest["state"], latest["rank"]) == ("resolved", None)
    assert "run gone expired after 61s without records" in latest["summary"]
    assert service.book.firing() == []
    assert [q[2] for q in queued(out)] == ["firing", "resolved"]


def test_acknowledging_shows_on_the_alert(start: Start) -> None:
    clock = Clock()
    service, out = start(clock)
    ingest(service, nan("r1", 0, clock.t))
    acked = out.acknowledge(1, "alice", "on it")
    assert acked is not None and acked["acknowledged"] and acked["acknowledged_comment"] == "on it"
    assert out.store.query_alerts(state="firing")["alerts"][0]["acknowledged_by"] == "alice"


@pytest.mark.parametrize("body, message", [
    ({"alert": "x", "until": 2e9}, "run: must be a run name"),
    ({"run": "r/1", "until": 2e9}, "run: must be a run name (1-128 of [A-Za-z0-9._:-]), got 'r/1'"),
    ({"run": "r1", "rank": -1, "until": 2e9}, "rank: must be an integer 0-2147483647 or null, got -1"),
    ({"run": "r1", "until": "tomorrow"}, "until: must be unix seconds, got 'tomorrow'"),
    ({"run": "r1", "until": 1e9}, "until: must be in the future and within 366 days, got 1000000000.0"),
    ({"run": "r1", "until": 2e9, "matchers": []}, "matchers: unknown field"),
    ([], "body: must be a JSON object, got list"),
])
def test_bad_silence_names_the_field_and_value(body: object, message: str) -> None:
    with pytest.raises(SilenceError) as err:
        parse(body, now=1_800_000_000.0)
    assert message in str(err.value)
