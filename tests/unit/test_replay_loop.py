"""One replay loop (pipeline.replay): what ``trainhealth replay`` prints is what tests and benchmarks get."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import pytest
from trainhealth import cli, jsonout
from trainhealth.config import default_detector_settings
from trainhealth.pipeline import Outcome, Pipeline, replay
from trainhealth.record import Record, from_obj
from trainhealth.replay import ReadStats, read_files

T0 = 1_700_000_000.0


def trace(steps: int = 400, silent_rank_after: int | None = None) -> list[dict[str, Any]]:
    """Two ranks, a step every 0.5 s; rank 1 diverges at step 300; rank 1 may go silent for good."""
    out = []
    for step in range(steps):
        for rank in (0, 1):
            if silent_rank_after is not None and rank == 1 and step > silent_rank_after:
                continue
            loss = math.nan if rank == 1 and step == 300 else 2.0 - step * 1e-3
            out.append({"run": "job", "rank": rank, "time": T0 + 0.5 * step + 0.01 * rank, "step": step,
                        "loss": loss, "lr": 0.1})
    return out


def write(path: Path, objs: Sequence[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path


class Recording(Pipeline):
    """The real pipeline, noting each batch it is fed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[list[Record]] = []

    def process(self, records: Sequence[Record], wall: float = 0.0) -> Outcome:
        self.batches.append(list(records))
        return super().process(records, wall)


def test_cli_prints_exactly_what_the_replay_loop_yields(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "run.jsonl", trace())
    assert cli.main(["replay", str(path)], environ={}) == 0
    printed = capsys.readouterr().out.splitlines()
    expected = list(replay(read_files([str(path)], ReadStats()), Pipeline(default_detector_settings()),
                           refreshes=True))  # transitions, and the refresh lines of open alerts
    assert printed == [jsonout.dumps(a) for a in expected]
    assert ("nan_divergence", "firing", None, 1) in {(a["alert"], a["state"], a["rank"], a.get("first_rank"))
                                                   for a in expected}


def test_a_recording_with_no_record_is_exit_1_not_a_clean_bill(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    corrupt = tmp_path / "corrupt.jsonl"
    corrupt.write_text("{not json\n")
    for path in (empty, corrupt):
        assert cli.main(["replay", str(path)], environ={}) == 1
        captured = capsys.readouterr()
        assert captured.out == ""
        assert f"no record read from {path}; nothing was checked" in captured.err
    assert cli.main(["replay", str(write(tmp_path / "run.jsonl", trace(steps=3)))], environ={}) == 0


def test_a_batch_stays_within_one_tick_and_max_batch() -> None:
    records = [from_obj(o) for o in trace(steps=100)]
    pipeline = Recording(default_detector_settings(), tick_seconds=1.0)
    list(replay(records, pipeline, max_batch=3))
    assert [r for b in pipeline.batches for r in b] == records  # every record once, in order
    assert max(len(b) for b in pipeline.batches) == 3
    assert all(b[-1].time - b[0].time < 1.0 for b in pipeline.batches)
    wide = Recording(default_detector_settings(), tick_seconds=1.0)
    list(replay(records, wide))
    assert [len(b) for b in wide.batches[:3]] == [4, 4, 4]  # two steps of two ranks per second


def test_until_lets_time_pass_so_a_rank_that_went_silent_is_reported() -> None:
    records = [from_obj(o) for o in trace(steps=400, silent_rank_after=350)]  # no end records: killed
    quiet = list(replay(records, Pipeline(default_detector_settings())))
    assert "rank_stalled" not in {a["alert"] for a in quiet}
    later = list(replay(records, Pipeline(default_detector_settings()), until=3600.0))
    stalled = [a for a in later if a["alert"] == "rank_stalled" and a["state"] == "firing"]
    assert stalled, later  # the ranks (or the run, as one incident) are reported once time passes
    assert {a["run"] for a in stalled} == {"job"}
