"""Snapshot + journal (checkpoint.py): a pipeline rebuilt after a kill answers like one never stopped."""

from __future__ import annotations

import copy
import math
import pickle
from pathlib import Path
from typing import Any

import pytest
from trainhealth.alerts import Alert
from trainhealth.checkpoint import Checkpoint, _Unpickler, lost_transitions
from trainhealth.config import default_detector_settings
from trainhealth.detectors.liveness import RankStalledSettings
from trainhealth.pipeline import Pipeline
from trainhealth.record import Record, from_obj

Event = tuple[str, Any, float]  # ("batch", records, wall) or ("tick", None, wall)


def settings() -> dict[str, Any]:
    s = default_detector_settings()
    s["rank_stalled"] = RankStalledSettings(floor_seconds=2, startup_seconds=2, silence_floor_seconds=60)
    return s


def trace() -> list[Event]:
    """4 ranks, a step per 0.1 s; rank 1 hangs (heartbeats only) for 4 s and recovers; rank 2 NaNs at
    step 50, rank 0 at 60; the timer ticks every second. Record time is wall time."""
    t0, out = 1000.0, []
    out.append(("batch", [from_obj({"type": "start", "run": "j", "rank": r, "time": t0, "world_size": 4})
                          for r in range(4)], t0))
    for step in range(1, 200):
        t = t0 + step * 0.1
        batch = []
        for r in range(4):
            hung = r == 1 and 80 <= step < 120
            fields: dict[str, Any] = {"run": "j", "rank": r, "time": t, "step": 79 if hung else step}
            if hung:
                fields["type"] = "heartbeat"
            else:
                fields["loss"] = math.nan if (r == 2 and step >= 50) or (r == 0 and step >= 60) else 1.0
            batch.append(from_obj(fields))
        out.append(("batch", batch, t))
        if step % 10 == 0:
            out.append(("tick", None, t + 0.05))
    return out


def feed(p: Pipeline, events: list[Event], cp: Checkpoint | None = None) -> list[Alert]:
    alerts: list[Alert] = []
    for kind, records, wall in events:
        if kind == "batch":
            alerts += p.process(records, wall=wall).alerts
            if cp is not None:
                cp.fed(records, wall, p.judge_after)
        else:
            alerts += p.tick_wall(wall)
            if cp is not None:
                cp.ticked(wall, p.judge_after)
    return alerts


def shown(alerts: list[Alert]) -> list[tuple[Any, ...]]:
    return [(a["alert"], a["state"], a["rank"], a["step"], a["time"], a.get("first_rank")) for a in alerts]


def restored(tmp_path: Path, stored: list[Alert], now: float) -> tuple[Pipeline, list[Alert]]:
    """A fresh pipeline whose book holds what the store holds open (as AlertsOut puts it back), restored."""
    p = Pipeline(settings())
    for a in stored:
        p.book.restore(copy.deepcopy(a))
    return p, Checkpoint(str(tmp_path / "state.db")).restore(p, now)


def open_after(alerts: list[Alert]) -> list[Alert]:
    book: dict[tuple[Any, ...], Alert] = {}
    for a in alerts:
        key = (a["run"], a["rank"], a["alert"])
        if a["state"] == "firing":
            book[key] = a
        else:
            book.pop(key, None)
    return list(book.values())


@pytest.mark.parametrize("snapshot_at", [None, 40, 100], ids=["journal-only", "early-snapshot", "late-snapshot"])
@pytest.mark.parametrize("kill_at", [60, 110, 125, 160])
def test_restored_pipeline_continues_exactly_like_one_never_killed(tmp_path: Path, snapshot_at: int | None,
                                                                    kill_at: int) -> None:
    events = trace()
    whole = feed(Pipeline(settings()), events)
    names = {(a["alert"], a["state"]) for a in whole}
    assert {("nan_divergence", "firing"), ("rank_stalled", "firing"), ("rank_stalled", "resolved")} <= names

    before_kill = Pipeline(settings())
    cp = Checkpoint(str(tmp_path / "state.db"))
    if snapshot_at is not None and snapshot_at < kill_at:
        sent = feed(before_kill, events[:snapshot_at], cp)
        cp.snapshot(before_kill, events[snapshot_at - 1][2])
        sent += feed(before_kill, events[snapshot_at:kill_at], cp)
    else:
        sent = feed(before_kill, events[:kill_at], cp)
    cp.close()  # kill -9: nothing more is written

    p, unsent = restored(tmp_path, open_after(sent), now=events[kill_at - 1][2])
    assert unsent == []
    after = feed(p, events[kill_at:])
    assert shown(sent + after) == shown(whole)
    assert p.findings("j") == Pipeline.findings(_fed(events), "j")


def _fed(events: list[Event]) -> Pipeline:
    p = Pipeline(settings())
    feed(p, events)
    return p


def test_alert_journaled_but_not_stored_before_the_kill_is_sent_after_restart(tmp_path: Path) -> None:
    events = trace()
    cut = next(i for i, e in enumerate(events) if e[0] == "batch" and e[1][2].loss != e[1][2].loss) + 1
    p = Pipeline(settings())
    cp = Checkpoint(str(tmp_path / "state.db"))
    sent = feed(p, events[:cut], cp)
    assert shown(sent[-1:]) == [("nan_divergence", "firing", None, 50, 1005.0, 2)]  # one incident per run
    cp.close()
    _, unsent = restored(tmp_path, open_after(sent[:-1]), now=events[cut - 1][2])  # the store lost it
    assert shown(unsent) == shown(sent[-1:])


def test_resolve_lost_in_the_kill_is_sent_and_nothing_else(tmp_path: Path) -> None:
    events = trace()
    whole = feed(Pipeline(settings()), events)
    resolve = next(a for a in whole if a["state"] == "resolved")
    cut = next(i for i, e in enumerate(events) if e[2] >= resolve["time"]) + 1
    p = Pipeline(settings())
    cp = Checkpoint(str(tmp_path / "state.db"))
    sent = feed(p, events[:cut], cp)
    assert sent[-1]["state"] == "resolved"
    cp.close()
    _, unsent = restored(tmp_path, open_after(sent[:-1]), now=events[cut - 1][2])
    assert shown(unsent) == shown(sent[-1:])


def test_downtime_is_nobodys_silence(tmp_path: Path) -> None:
    events = trace()[:80]
    p = Pipeline(settings())
    cp = Checkpoint(str(tmp_path / "state.db"))
    sent = feed(p, events, cp)
    cp.snapshot(p, events[-1][2])
    cp.close()
    now = events[-1][2] + 3600  # down for an hour
    q, unsent = restored(tmp_path, open_after(sent), now=now)
    assert unsent == []
    assert q.tick_wall(now + 1.0) == []  # one second after the restart: nobody was silent for an hour
    stalled = q.tick_wall(now + 70.0)  # but a rank that sends nothing after the restart is caught
    assert [a["silent_ranks"] for a in stalled if a["alert"] == "rank_stalled"] == [[0, 1, 2, 3]]


def test_snapshot_of_another_version_is_not_loaded(tmp_path: Path) -> None:
    events = trace()[:80]
    p = Pipeline(settings())
    cp = Checkpoint(str(tmp_path / "state.db"))
    feed(p, events, cp)
    cp.snapshot(p, events[-1][2])
    cp.db.execute("UPDATE pipeline_snapshot SET code = 'older'")
    cp.close()
    q, unsent = restored(tmp_path, [], now=events[-1][2])
    assert q.runs == {} and unsent == []


def test_unpickling_refuses_anything_but_trainhealth_state() -> None:
    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            import os
            return (os.system, ("true",))

    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system"):
        _Unpickler(__import__("io").BytesIO(pickle.dumps(Evil()))).load()


def test_every_detectors_state_pickles_after_a_trace() -> None:
    """A detector rewrite that keeps a lambda or a generator in its state breaks restarts: caught here."""
    p = _fed(trace())
    state = pickle.dumps((p.runs, p.detectors))
    runs, detectors = _Unpickler(__import__("io").BytesIO(state)).load()
    assert sorted(runs) == ["j"] and [d.name for d in detectors["j"]] == [d.name for d in p.detectors["j"]]


def test_lost_transitions_sends_the_stored_episodes_resolve_then_the_new_firing() -> None:
    def alert(state: str, time: float, started_at: float | None = None) -> Alert:
        return {"alert": "a", "state": state, "run": "r", "rank": 0, "time": time,
                "started_at": time if started_at is None else started_at}

    stored = alert("firing", 1.0)
    before = {("r", 0, "a"): stored}
    r1, f2, r2, f3 = alert("resolved", 2.0), alert("firing", 3.0), alert("resolved", 4.0), alert("firing", 5.0)
    assert lost_transitions(before, {("r", 0, "a"): f3}, [r1, f2, r2, f3]) == [r1, f3]
    assert lost_transitions(before, dict(before), [alert("firing", 2.0)]) == []
    assert lost_transitions({}, {}, [f2, r2]) == []


def test_an_episode_that_fired_resolved_and_fired_again_in_the_replay_is_not_sent_again() -> None:
    # the store holds the latest episode (fired at 3.0) open; the snapshot is older: the replay sees the earlier
    # episode fire (absorbed: the key is open), resolve (closes the stored one in the book) and re-fire at 3.0
    def alert(state: str, time: float, started_at: float) -> Alert:
        return {"alert": "a", "state": state, "run": "r", "rank": 0, "time": time, "started_at": started_at}

    stored = alert("firing", 3.0, 3.0)
    resolve, refire = alert("resolved", 2.0, 1.0), alert("firing", 3.0, 3.0)
    assert lost_transitions({("r", 0, "a"): stored}, {("r", 0, "a"): refire}, [resolve, refire]) == []


def test_records_keep_nan_through_the_journal(tmp_path: Path) -> None:
    cp = Checkpoint(str(tmp_path / "state.db"))
    rec = Record(run="r", rank=0, time=1.0, step=1, loss=math.nan, grad_norm=math.inf)
    cp.fed([rec], 1.0, -math.inf)
    p = Pipeline(default_detector_settings())
    cp2 = Checkpoint(str(tmp_path / "state.db"))
    unsent = cp2.restore(p, 1.0)
    assert [(a["alert"], a["state"]) for a in unsent] == [("nan_divergence", "firing")]


def test_a_snapshot_that_cannot_pickle_is_counted_and_the_journal_kept(tmp_path: Path) -> None:
    events = trace()[:80]
    p = Pipeline(settings())
    cp = Checkpoint(str(tmp_path / "state.db"))
    sent = feed(p, events, cp)
    p.detectors["j"][0].__dict__["callback"] = lambda: None  # a rewrite that keeps a lambda in its state
    cp.snapshot(p, events[-1][2])
    assert cp.errors == 1 and cp.dirty
    cp.close()
    q, unsent = restored(tmp_path, open_after(sent), now=events[-1][2])
    assert unsent == [] and sorted(q.runs["j"].ranks) == [0, 1, 2, 3]  # the journal alone rebuilt it


def test_a_snapshot_written_leaves_no_copy_of_the_state_in_memory(tmp_path: Path) -> None:
    """SQLite keeps a cached statement's bound values until the statement runs again: the snapshot's INSERT
    would hold a copy of the whole pickled state until the next snapshot (a copy this large is a memory
    mapping of its own, given back to the system when freed)."""
    import psutil

    events = trace()[:40]
    p = Pipeline(settings())
    cp = Checkpoint(str(tmp_path / "state.db"))
    feed(p, events, cp)
    p.detectors["j"][0].__dict__["ballast"] = b"\x01" * (48 << 20)  # state of 48 MiB, pickled as it is
    process = psutil.Process()
    before = process.memory_info().rss
    cp.snapshot(p, events[-1][2])
    grown = process.memory_info().rss - before
    assert cp.errors == 0 and not cp.dirty
    assert grown < 16 << 20, f"RSS grew {grown >> 20} MiB over a snapshot of 48 MiB"
    cp.close()
