"""The end of a recording: ``trainhealth replay --until`` tells what the live sidecar tells at the same moments.

After the last record, replay lets time pass as the server's timer does (a tick every second on each run's own
clock), not in one jump to ``until``: a detector judges what it sees at its tick, so one late tick pictured a
rank that went silent 40 s before the end with every rank that crossed its limit by ``until`` (silent_ranks
[0, 1, 2, 3], where the sidecar then saw [1]), and dated a host leak waiting 5 s for its peers at the end of
the replayed time. And once a rank is named silent while the others still sent, the others going quiet later
(the job stopped, or only the recording ended) does not re-tell the incident as "every rank went silent":
the root stays the rank that went silent first (docs/liveness.md, "The end of a recording").

Each case is replayed (``pipeline.replay``, refresh lines included) and fed the live way (one record per
request, a timer tick every second, ``lt.feed``), and the two are compared field for field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from trainhealth.cli import main as cli_main
from trainhealth.config import default_detector_settings
from trainhealth.pipeline import Pipeline, replay
from trainhealth.record import Record

from tests import live_traces as lt
from tests import memory_traces as mt

GiB = mt.GiB


def replayed(records: list[Record], until: float) -> list[dict[str, Any]]:
    return [dict(a) for a in replay(records, Pipeline(default_detector_settings()), until=until, refreshes=True)]


def live(records: list[Record], until: float) -> list[dict[str, Any]]:
    return [dict(a) for a in lt.feed(records, until=records[-1].time + until, refreshes=True)]


def tail_silent() -> list[Record]:
    """4 ranks beating every 2 s; rank 1's records stop at T0+65 (after step 119), the others finish step 200
    at T0+105 and the file ends there: rank 1 crosses its 60 s limit 19.5 s after the end."""
    return lt.ddp_job(4, 200, silent_at={1: lt.T0 + 65}, heartbeat=2.0).records


def blocked_behind() -> list[Record]:
    """Synchronous training: rank 1's records stop at T0+60.2 after step 110, the others stand at step 110
    too, waiting in the all-reduce, heartbeating until the file ends at T0+199."""
    return lt.ddp_job(4, 110, silent_at={1: lt.T0 + 60.2}, until=lt.T0 + 200).records


def test_a_rank_silent_before_the_end_is_told_alike_and_stays_the_root() -> None:
    records = tail_silent()
    got = replayed(records, 120.0)
    assert got == live(records, 120.0)  # every field, the refresh lines too
    assert [(a["state"], a.get("refreshed", False), a["silent_ranks"], a["root_ranks"]) for a in got] == [
        ("firing", False, [1], [1]),  # at T0+124.5: only rank 1 had crossed its limit (was [0, 1, 2, 3])
        ("firing", True, [0, 1, 2], [1]),  # T0+165: the others cross theirs, a second apart
        ("firing", True, [0, 1, 2, 3], [1])]
    assert got[0]["time"] == pytest.approx(lt.T0 + 124.5) and got[0]["summary"].startswith(
        "rank 1 went silent after step 119: nothing from it for 60 s (")
    assert "; ranks 0, 2-3 still finish steps;" in got[0]["summary"]
    last = got[-1]  # the incident as it ended up (the report's and the store's picture)
    assert last["summary"].startswith("rank 1 went silent after step 119: nothing from it for 102 s (")
    assert "; ranks 0, 2-3 went quiet 40 s after it (stopped too, or the recording ends there);" in last["summary"]
    assert "every rank" not in last["summary"]
    assert (last["reason"], last["first_rank"], last["waiting_ranks"]) == ("silent", 1, [])


def test_a_root_the_others_waited_for_is_not_lost_when_they_stop_too() -> None:
    """The refresh after the others' stop was "every rank went silent within 139.0 s; all 4 ranks stand at step
    110: ... cannot be told from steps" with root_ranks []: the end of the file erased the root."""
    records = blocked_behind()
    got = replayed(records, 300.0)
    assert got == live(records, 300.0)
    assert [(a.get("refreshed", False), a["root_ranks"], a["silent_ranks"], a["stuck_ranks"]) for a in got] == [
        (False, [1], [1], []), (True, [1], [1], [0, 2, 3])]  # T0+120, then T0+241: the others' step limit
    assert "; ranks 0, 2-3 wait in a collective;" in got[0]["summary"]
    assert got[1]["summary"].startswith("rank 1 went silent after step 110: nothing from it for 181 s (")
    assert "; ranks 0, 2-3 went quiet 137 s after it (stopped too, or the recording ends there);" in got[1]["summary"]


def test_until_shorter_than_the_others_limit_calls_only_the_root_silent() -> None:
    """--until 30: the end of the file plus 30 s, no rank that sent until the end is judged silent."""
    records = tail_silent()
    got = replayed(records, 30.0)
    assert got == live(records, 30.0)
    assert [(a["state"], a["silent_ranks"]) for a in got] == [("firing", [1])]


def test_ranks_that_stop_together_at_the_end_stay_one_picture() -> None:
    """Healthy, alarming: every rank's records end with the file, rank 1's 20 s before the others' (under half
    their silence limit): no rank went silent while the others still sent, so none is named first."""
    records = lt.ddp_job(4, 200, silent_at={1: lt.T0 + 85}, heartbeat=2.0).records
    got = replayed(records, 120.0)
    assert got == live(records, 120.0)
    assert [a["root_ranks"] for a in got] == [[1], [1], [1]]  # the lowest step: rank 1's, as before
    assert all(a["summary"].startswith("every rank went silent within 20.5 s; rank 1 stopped first (at step 159;")
               and "went quiet" not in a["summary"] for a in got)


def test_a_host_leak_judged_after_the_end_is_dated_when_the_sidecar_would_judge_it() -> None:
    """The leak's incident waits 5 s for its peers; the file ends within them: it was dated at the end of the
    replayed time (T+120), the sidecar judges it at the first tick after the 5 s."""
    trace = mt.host_trace({0: mt.total(mt.const(4 * GiB), mt.linear(2 * GiB)), 1: mt.const(4 * GiB)}, hours=1)
    fired = [a for a in live(trace, 0.0) if a["alert"] == "host_memory_leak"]
    assert fired
    cut = [r for r in trace if r.time < fired[0]["time"] - 2.0]  # the records up to its wait for peers
    got = replayed(cut, 120.0)
    assert got == live(cut, 120.0)
    assert [a["alert"] for a in got] == ["host_memory_leak"]
    assert cut[-1].time < got[0]["time"] <= cut[-1].time + 6.0


def test_the_cli_prints_what_the_sidecar_would_have_said(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records = tail_silent()
    path = lt.write_jsonl(tmp_path / "job.jsonl", records)
    assert cli_main(["replay", path, "--until", "120"]) == 0
    lines = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert lines == json.loads(json.dumps(live(records, 120.0)))



def test_until_past_run_ttl_reports_the_silence_then_forgets_the_run() -> None:
    """--until longer than limits.run_ttl_seconds (6 h): the sidecar reports the silence, and forgets the run
    6 h after its last record. One tick at the end forgot the run at once: nothing was reported at all."""
    records = tail_silent()
    got = replayed(records, 30_000.0)
    assert got == live(records, 30_000.0)
    assert [(a["state"], a.get("refreshed", False)) for a in got] == [
        ("firing", False), ("firing", True), ("firing", True), ("resolved", False)]
    assert got[-1]["summary"] == "run job expired after 21601s without records"
