"""The SQLite store: history with stable ids, open alerts, paging, acks, silences, outbox, runs and starts."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterator

import pytest
from trainhealth import jsonout
from trainhealth.alerts import fingerprint
from trainhealth.notify.store import Store, Transition
from trainhealth.record import from_obj


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


Opener = Callable[..., Store]


@pytest.fixture
def opened() -> Iterator[Opener]:
    """opened(path, clock=...) -> Store, closed at teardown."""
    stores: list[Store] = []

    def open_store(path: Path, clock: Callable[[], float] = Clock()) -> Store:
        stores.append(Store(str(path), clock=clock))
        return stores[-1]

    yield open_store
    for s in stores:
        s.close()


def make_alert(store: Store, state: str, run: str = "r1", rank: int | None = 0, name: str = "nan_divergence",
               time: float = 100.0, **extra: object) -> dict:
    alert = {"alert": name, "state": state, "severity": "critical", "run": run, "rank": rank, "step": 7,
             "time": time, "summary": f"{name} {state}", "started_at": time,
             "fingerprint": fingerprint((run, rank, name)), **extra}
    alert["id"] = store.new_id()
    return alert


def fire(store: Store, **kw: object) -> dict:
    a = make_alert(store, "firing", **kw)  # type: ignore[arg-type]
    store.write([Transition(a, a["id"], False, jsonout.dumps(a))], [], [])
    return a


def resolve(store: Store, firing: dict, time: float = 200.0) -> dict:
    a = make_alert(store, "resolved", run=firing["run"], rank=firing["rank"], name=firing["alert"], time=time)
    store.write([Transition(a, firing["id"], False, jsonout.dumps(a))], [firing["id"]], [])
    return a


def test_history_is_newest_first_with_stable_ids_and_nan_kept(tmp_path: Path, opened: Opener) -> None:
    store = opened(tmp_path / "t.db")
    a = fire(store, loss=math.nan)
    b = fire(store, rank=1)
    got = store.query_alerts()
    assert [x["id"] for x in got["alerts"]] == [b["id"], a["id"]] == [2, 1]
    assert got["alerts"][1]["loss"] == "NaN"  # never null
    assert got["alerts"][1]["silenced"] is False and got["alerts"][1]["acknowledged"] is False
    assert got["next_cursor"] is None


def test_state_firing_means_open_now_and_resolved_lists_resolves(tmp_path: Path, opened: Opener) -> None:
    store = opened(tmp_path / "t.db")
    a = fire(store, rank=0)
    b = fire(store, rank=1)
    r = resolve(store, a)
    assert [x["id"] for x in store.query_alerts(state="firing")["alerts"]] == [b["id"]]
    assert [x["id"] for x in store.query_alerts(state="resolved")["alerts"]] == [r["id"]]
    assert [x["id"] for x in store.query_alerts()["alerts"]] == [r["id"], b["id"], a["id"]]


def test_filters_by_run_alert_and_since(tmp_path: Path, opened: Opener) -> None:
    store = opened(tmp_path / "t.db")
    fire(store, run="r1", time=10.0)
    x = fire(store, run="r2", time=20.0)
    y = fire(store, run="r2", name="gpu_oom", time=30.0)
    assert [a["id"] for a in store.query_alerts(run="r2")["alerts"]] == [y["id"], x["id"]]
    assert [a["id"] for a in store.query_alerts(alert="gpu_oom")["alerts"]] == [y["id"]]
    assert [a["id"] for a in store.query_alerts(since=20.0)["alerts"]] == [y["id"], x["id"]]
    assert store.query_alerts(run="r3")["alerts"] == []


def test_paging_with_cursor_walks_every_alert_once(tmp_path: Path, opened: Opener) -> None:
    store = opened(tmp_path / "t.db")
    ids = [fire(store, rank=i)["id"] for i in range(7)]
    seen, cursor = [], None
    while True:
        page = store.query_alerts(limit=3, cursor=cursor)
        seen += [a["id"] for a in page["alerts"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]


def test_ack_marks_the_whole_episode(tmp_path: Path, opened: Opener) -> None:
    clock = Clock()
    store = opened(tmp_path / "t.db", clock=clock)
    a = fire(store)
    r = resolve(store, a)
    other = fire(store, rank=3)
    acked = store.acknowledge(r["id"], "alice", "looking")
    assert acked is not None and acked["acknowledged"] is True and acked["acknowledged_by"] == "alice"
    by_id = {x["id"]: x for x in store.query_alerts()["alerts"]}
    assert by_id[a["id"]]["acknowledged"] and by_id[a["id"]]["acknowledged_at"] == clock.t
    assert by_id[other["id"]]["acknowledged"] is False
    assert store.acknowledge(999, None, None) is None


def test_reopening_restores_open_alerts_and_continues_ids(tmp_path: Path, opened: Opener) -> None:
    path = tmp_path / "t.db"
    store = opened(path)
    a = fire(store, rank=0)
    b = fire(store, rank=1, loss=math.inf)
    resolve(store, a)
    store.close()
    again = opened(path)
    restored = again.open_alerts()
    assert [(x["id"], silenced) for x, silenced in restored] == [(b["id"], False)]
    assert restored[0][0]["loss"] == "Infinity"
    assert again.new_id() > 3  # past every id handed out (and those reserved: see test_store_honesty)


def test_outbox_rows_are_fifo_per_target_and_keep_attempts(tmp_path: Path, opened: Opener) -> None:
    store = opened(tmp_path / "t.db")
    a = make_alert(store, "firing")
    store.write([Transition(a, a["id"], False, jsonout.dumps(a))], [],
                [("hook1", "k1", "[1]"), ("hook2", "k2", "[2]"), ("hook1", "k3", "[3]")])
    assert store.pending() == {"hook1": 2, "hook2": 1}
    head = store.due("hook1", 1)[0]
    assert (head.key, head.payload, head.attempts) == ("k1", "[1]", 0)
    store.attempt_failed(head.id, "HTTP 503")
    assert store.due("hook1", 1)[0].attempts == 1
    store.delivered(head.id)
    assert [r.key for r in store.due("hook1")] == ["k3"]
    assert store.pending() == {"hook1": 1, "hook2": 1}


def test_silences_are_listed_until_they_expire(tmp_path: Path, opened: Opener) -> None:
    clock = Clock(1000.0)
    store = opened(tmp_path / "t.db", clock=clock)
    sid, created = store.add_silence("r1", "nan_divergence", None, 2000.0, "known issue", "bob")
    assert created == 1000.0
    assert [s["id"] for s in store.silences(active_at=1500.0)] == [sid]
    assert store.expire_silence(sid, 1500.0) is True
    assert store.silences(active_at=1500.0) == []
    assert store.silences()[0]["until"] == 1500.0
    assert store.expire_silence(12345, 1500.0) is False


def test_runs_and_start_records_are_kept_and_last_seen_is_throttled(tmp_path: Path, opened: Opener) -> None:
    clock = Clock(1000.0)
    store = opened(tmp_path / "t.db", clock=clock)
    start = from_obj({"type": "start", "run": "r1", "rank": 0, "time": 5.0, "world_size": 8, "lr": 0.1,
                      "batch_size": 32})
    sample = from_obj({"run": "r1", "rank": 0, "time": 6.0, "step": 1, "loss": 2.0})
    store.note_records([start, sample])
    assert store.starts("r1") == [{"type": "start", "run": "r1", "rank": 0, "time": 5.0, "world_size": 8,
                                   "lr": 0.1, "batch_size": 32}]
    clock.t = 1030.0
    store.note_records([sample])  # within a minute: no write
    assert store.runs_last_seen() == {"r1": 1000.0}
    clock.t = 1061.0
    store.note_records([sample])
    assert store.runs_last_seen() == {"r1": 1061.0}
