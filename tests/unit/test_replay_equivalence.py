"""The fast paths give the alert stream of the slow ones, on the suite's corpora.

- The pipeline takes batches (sorted by step, detectors' updates bound once per run, ticks within a batch):
  replaying with batches of 256, 64 or 7 records gives the same transitions, field for field, as feeding one
  record at a time.
- The flight recorder writes with msgspec (json only for a batch that holds NaN): ``trainhealth replay`` of
  what it wrote gives the same transitions as the records themselves.
- The live path (the server: one record per request, a timer tick every second) gives the same transitions,
  field for field, and the same refresh lines: replay ticks a run every second while its records pause and
  after the last one, as the server's timer does (docs/liveness.md, "The end of a recording").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from trainhealth.alerts import Alert
from trainhealth.cli import main as cli_main
from trainhealth.config import default_detector_settings
from trainhealth.pipeline import Pipeline, replay
from trainhealth.record import Record, from_obj
from trainhealth.recorder import FlightRecorder

from tests import live_traces as lt
from tests import memory_traces as mt
from tests import page_traces as pt

GiB = mt.GiB
UNTIL = 120.0


def corpora() -> dict[str, list[Record]]:
    out = {
        "healthy": lt.ddp_job(4, 300).records,
        "stalled": lt.ddp_job(4, 200, last_step={2: 120}, until=lt.T0 + 400).records,
        "silent": lt.ddp_job(4, 200, silent_at={1: lt.T0 + 60}).records,
        "straggler": lt.ddp_job(4, 400, data_time=lambda r, k: 0.4 if r == 3 and 50 < k < 200 else 0.01).records,
        "paused": lt.ddp_job(4, 200, pauses={100: 300.0}).records,
        "ended": lt.ddp_job(3, 100, end=True).records,
        "host_leak": mt.host_trace({0: mt.total(mt.const(4 * GiB), mt.linear(2 * GiB)), 1: mt.const(4 * GiB)},
                                   hours=3),
        "host_sawtooth": mt.host_trace({0: mt.total(mt.const(4 * GiB), mt.sawtooth(1 * GiB, 600)),
                                        1: mt.const(4 * GiB)}, hours=3),
        "gpu_growth": mt.gpu_trace({0: mt.total(mt.const(40 * GiB), mt.linear(3600 * 2 * GiB)),
                                    1: mt.const(40 * GiB)}, steps=3000),
        "diverging": [from_obj(o) for o in pt.diverging_run()],
    }
    return {name: sorted(recs, key=lambda r: r.time) for name, recs in out.items()}


CORPORA = corpora()


def transitions(alerts: Any) -> list[dict[str, Any]]:
    return [dict(a) for a in alerts]


def replayed(records: list[Record], max_batch: int = 256, refreshes: bool = False,
             pipeline: Pipeline | None = None) -> list[dict[str, Any]]:
    return transitions(replay(records, pipeline or Pipeline(default_detector_settings()), max_batch=max_batch,
                              until=UNTIL, refreshes=refreshes))


def test_the_corpora_raise_and_resolve_alerts_of_many_kinds() -> None:
    """An empty stream would prove nothing: together the corpora fire and resolve several detectors'
    alerts (the healthy ones stay silent but for the hang at their end)."""
    got = {(a["alert"], a["state"]) for recs in CORPORA.values() for a in replayed(recs)}
    # (not which ones: the detectors are rewritten often; only that the streams compared are not empty)
    assert len({a for a, _ in got}) >= 4, got
    assert any(state == "resolved" for _, state in got)
    assert replayed(CORPORA["host_sawtooth"]) == [] and replayed(CORPORA["gpu_growth"]) == []


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_batches_of_any_size_give_what_one_record_at_a_time_gives(name: str) -> None:
    records = CORPORA[name]
    one = replayed(records, max_batch=1)
    for size in (256, 64, 7):
        assert replayed(records, max_batch=size) == one, size


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_replay_of_what_the_recorder_wrote_gives_the_same_alerts(name: str, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    records = CORPORA[name]
    recorder = FlightRecorder(tmp_path)
    for i in range(0, len(records), 100):  # batches, as ingest hands them over
        recorder.write(records[i:i + 100])
    recorder.close()
    files = sorted(str(p) for p in tmp_path.glob("*.jsonl"))
    assert cli_main(["replay", *files, "--until", str(UNTIL)]) == 0
    import json

    lines = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    expected = replayed(records, refreshes=True)  # the CLI prints the refresh lines too: compared as well
    assert [(a["alert"], a["state"], a["rank"], a["step"], a["summary"], a.get("refreshed")) for a in lines] == \
        [(a["alert"], a["state"], a["rank"], a["step"], a["summary"], a.get("refreshed")) for a in expected]


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_the_live_path_gives_the_same_alerts_as_replay(name: str) -> None:
    """Field for field: summaries, the ranks silent at the verdict, the straggler's step, a leak's figures. The
    refresh lines too, with one record per batch as the server takes them (a batch of 256 hands the refreshes
    of its records out once, with the latest picture: the diverging run's loss_spike)."""
    records = CORPORA[name]
    live: list[Alert] = lt.feed(records, until=records[-1].time + UNTIL)
    assert transitions(live) == replayed(records)
    lines = lt.feed(records, until=records[-1].time + UNTIL, refreshes=True)
    assert transitions(lines) == replayed(records, max_batch=1, refreshes=True)


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_refresh_lines_change_no_transition_and_end_where_the_alert_ended_up(name: str) -> None:
    """Replay's refresh lines (``refreshed: true``) come between the transitions, which stay as they were;
    each follows its episode's firing while it is open, and an episode's last line is the alert as the
    book holds it at the end: what the store's body and the report show."""
    pipeline = Pipeline(default_detector_settings())
    lines = replayed(CORPORA[name], refreshes=True, pipeline=pipeline)
    assert [a for a in lines if "refreshed" not in a] == replayed(CORPORA[name])
    open_now: set[tuple[str, float]] = set()
    last: dict[tuple[str, float], dict[str, Any]] = {}
    for a in lines:
        episode = (a["fingerprint"], a["started_at"])
        if a.get("refreshed"):
            assert (a["state"], a["refreshed"]) == ("firing", True) and episode in open_now, a
        elif a["state"] == "firing":
            open_now.add(episode)
        else:
            open_now.discard(episode)
        if a["state"] == "firing":
            last[episode] = {k: v for k, v in a.items() if k != "refreshed"}
    firings = [a for a in lines if a["state"] == "firing" and "refreshed" not in a]
    assert list(last.values()) == transitions(pipeline.book.latest(firings))  # type: ignore[arg-type]


def test_the_corpora_have_alerts_refreshed_in_place() -> None:
    """Not vacuous: a stall whose waiting ranks join it, a divergence whose second rank's NaN joins it, and the
    hangs at the end of a recording whose other ranks cross their limits a tick or more after the first (after
    the last record --until ticks every second, as the server's timer: tests/unit/test_replay_end_of_recording.py)."""
    refreshed = {name: [(a["alert"], a["step"], a.get("last_step")) for a in replayed(recs, refreshes=True)
                        if a.get("refreshed")] for name, recs in CORPORA.items()}
    assert {name: got for name, got in refreshed.items() if got} == {
        "stalled": [("rank_stalled", 120, 120)],
        "diverging": [("lr_scaling", 0, 146), ("nan_divergence", 150, 150)],
        "healthy": [("rank_stalled", 300, 300)], "straggler": [("rank_stalled", 400, 400)],
        "paused": [("rank_stalled", 200, 200)], "silent": [("rank_stalled", 109, 109)] * 2}
