"""The flight recorder writes with msgspec where it can: each line must still read back as what
``json.dumps(to_obj(record))`` wrote (``type`` always there, NaN a bare token, an ``end``'s error whole)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from trainhealth.record import from_obj, to_obj
from trainhealth.recorder import FlightRecorder, lines
from trainhealth.replay import ReadStats, read_files

OBJS = [
    {"run": "r", "rank": 0, "time": 1.0, "step": 1, "loss": 2.5, "lr": 0.1, "config": {"step": 3, "type": "x"}},
    {"run": "r", "rank": 0, "time": 1.5, "step": 1, "type": "heartbeat", "phase": "data", "phase_time": 1.25},
    {"run": "r", "rank": 1, "time": 1.0, "type": "start", "host": "n\u00e9", "config": {"big": 10**30, "l": [1.5]}},
    {"run": "r", "rank": 0, "time": 2.0, "step": 2, "metrics": {"step": 1.0, "tokens": 5.0}, "grad_scale": 1e20},
    {"run": "r", "rank": 0, "time": 3.0, "step": 3, "type": "oom", "message": "CUDA out of memory", "detail": "x"},
]


def check(objs: list[dict]) -> None:
    records = [from_obj(o) for o in objs]
    text = lines(records)
    assert text.endswith("\n") and text.count("\n") == len(records)
    for rec, line in zip(records, text.splitlines(), strict=True):
        got, want = json.loads(line), to_obj(rec)
        same = json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True)  # NaN != NaN as a value
        assert same and list(got)[:4] == ["run", "rank", "time", "type"], (got, want)


def test_lines_read_back_as_the_json_of_each_record() -> None:
    check(OBJS)


def test_a_batch_with_nan_null_or_an_error_is_written_with_json() -> None:
    nan = {"run": "r", "rank": 0, "time": 4.0, "step": 4, "loss": math.nan, "grad_norm": -math.inf}
    check([*OBJS, nan])
    text = lines([from_obj(nan)])
    assert '"loss":NaN' in text and '"grad_norm":-Infinity' in text
    check([{"run": "r", "rank": 0, "time": 4.0, "step": 4, "metrics": {"m": None}}])
    check([{"run": "r", "rank": 0, "time": 5.0, "step": 5, "type": "end", "status": "failed",
            "error": {"type": "ValueError"}}])


def test_replay_reads_the_recorders_file_back_record_for_record(tmp_path: Path) -> None:
    records = [from_obj(o) for o in OBJS]
    recorder = FlightRecorder(tmp_path)
    recorder.write(records[:2])
    recorder.write(records[2:])
    recorder.close()
    stats = ReadStats()
    assert list(read_files([str(tmp_path / "r.jsonl")], stats)) == records and stats.skipped == 0
