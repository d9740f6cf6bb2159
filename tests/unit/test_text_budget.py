"""One memory budget for the long text runs keep (OOM details, start configs): the oldest give way, and a
restore counts what the restored runs hold."""

from __future__ import annotations

from trainhealth.config import Limits, load
from trainhealth.pipeline import Pipeline
from trainhealth.record import Record
from trainhealth.textbudget import TextBudget


def oom(rank: int, t: float, size: int) -> Record:
    return Record(run="r", rank=rank, time=t, type="oom", step=1, message="CUDA out of memory", detail="d" * size)


def start(rank: int, t: float, size: int) -> Record:
    return Record(run="r", rank=rank, time=t, type="start", config={"notes": "c" * size})


def test_the_oldest_text_gives_way_and_the_newest_stays() -> None:
    pipeline = Pipeline(load(None, {}, {}).detectors, Limits(max_text_bytes=3500))
    pipeline.process([start(0, 1.0, 1000), oom(0, 2.0, 1000), oom(1, 3.0, 1000)])
    ranks = pipeline.runs["r"].ranks
    assert pipeline.text.used == 1012 + 2000 and ranks[0].last_oom["detail"] == "d" * 1000  # all fit
    pipeline.process([oom(2, 4.0, 1000)])
    assert pipeline.runs["r"].starts[0].config is not None
    assert "limits.max_text_bytes" in pipeline.runs["r"].starts[0].config["trainhealth"]  # the oldest: the start
    assert [ranks[r].last_oom["detail"] for r in (0, 1, 2)] == ["d" * 1000] * 3
    pipeline.process([oom(3, 5.0, 3000)])  # a big one: only it fits
    kept = [ranks[r].last_oom["detail"] == "d" * len(ranks[r].last_oom["detail"]) for r in (0, 1, 2, 3)]
    assert kept == [False, False, False, True] and pipeline.text.used == 3000
    assert ranks[0].last_oom["message"] == "CUDA out of memory"  # only the long text goes


def test_a_restore_counts_what_the_restored_runs_keep() -> None:
    pipeline = Pipeline(load(None, {}, {}).detectors, Limits(max_text_bytes=10_000))
    pipeline.process([oom(0, 2.0, 4000), start(1, 1.0, 4000)])
    fresh = TextBudget(5000)
    fresh.rebuild(pipeline.runs)  # oldest first: the start (time 1) gives way to the OOM (time 2)
    assert fresh.used == 4000
    assert "limits.max_text_bytes" in pipeline.runs["r"].starts[0].config["trainhealth"]
    assert pipeline.runs["r"].ranks[0].last_oom["detail"] == "d" * 4000
