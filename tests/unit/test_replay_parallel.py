"""``trainhealth replay --jobs N`` gives each run the alerts of the serial replay, in the same order; when
the files do not split by run it replays serially and gives exactly the serial output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from trainhealth.cli import main as cli_main
from trainhealth.record import Record, from_obj
from trainhealth.recorder import FlightRecorder
from trainhealth.replay_parallel import groups

from tests import live_traces as lt
from tests import page_traces as pt


def recording(tmp_path: Path) -> list[Record]:
    records = [*lt.shifted(lt.ddp_job(3, 150, last_step={1: 90}, until=lt.T0 + 200).records, run="stall"),
               *[from_obj(o) for o in pt.diverging_run(run="diverge")],
               *lt.shifted(lt.ddp_job(2, 120, data_time=lambda r, k: 0.4 if r == 1 and k > 30 else 0.01,
                                      t0=lt.T0 + 50).records, run="slow")]
    records.sort(key=lambda r: r.time)
    recorder = FlightRecorder(tmp_path, max_bytes=40_000)  # "slow" and "stall" rotate: RUN.jsonl.1 too
    for i in range(0, len(records), 50):
        recorder.write(records[i:i + 50])
    recorder.close()
    return records


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[list[dict[str, Any]], str]:
    assert cli_main(["replay", *args]) == 0
    out = capsys.readouterr()
    return [json.loads(ln) for ln in out.out.splitlines()], out.err


def by_run(alerts: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for a in alerts:
        out.setdefault(a["run"], []).append(a)
    return out


def test_each_run_gets_the_serial_alerts_in_their_order(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recording(tmp_path)
    files = sorted(str(p) for p in tmp_path.iterdir())
    assert len(files) > 3 and len(groups(files)) == 3  # rotated pieces go with their run
    serial, serial_err = run_cli(capsys, *files, "--until", "60")
    parallel, parallel_err = run_cli(capsys, *files, "--until", "60", "--jobs", "3")
    assert {a["run"] for a in serial} == {"stall", "diverge", "slow"}  # every run has something to say
    assert by_run(parallel) == by_run(serial)
    when = [a["last_time"] if a.get("refreshed") else a["time"] for a in parallel]  # a refresh: at its last event
    assert when == sorted(when)  # merged by time
    # merged too; rank_stalled's: rank 0 crosses its silence limit after the recording's end, a tick after the
    # stall fired (--until ticks every second, as the server's timer)
    assert [a["alert"] for a in serial if a.get("refreshed")] == ["lr_scaling", "nan_divergence", "rank_stalled"]
    assert parallel_err == serial_err  # the same record and skipped-line counts


def test_files_that_do_not_split_by_run_are_replayed_serially(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    records = recording(tmp_path)
    extra = tmp_path / "mixed.jsonl"  # records of a run that has files of its own, under another name
    extra.write_text("".join(json.dumps({"run": "slow", "rank": 5, "time": r.time, "step": r.step}) + "\n"
                             for r in records[-40:] if r.step is not None))
    files = sorted(str(p) for p in tmp_path.iterdir())
    serial, serial_err = run_cli(capsys, *files, "--until", "60")
    parallel, parallel_err = run_cli(capsys, *files, "--until", "60", "--jobs", "4")  # a share per group
    assert (parallel, parallel_err) == (serial, serial_err)


def test_jobs_must_be_positive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text('{"run":"r","rank":0,"time":1,"step":1}\n')
    assert cli_main(["replay", str(path), "--jobs", "0"]) == 2
    assert "--jobs: must be >= 1" in capsys.readouterr().err
