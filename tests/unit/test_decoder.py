"""The run-name cache belongs to a Decoder (one per Service, one per replay), never to the process."""

from __future__ import annotations

import json
from typing import Any

import pytest
from trainhealth.config import Settings
from trainhealth.ingest import Decoder
from trainhealth.record import RecordError, RunNames, check, from_obj
from trainhealth.service import Service


def body(*runs: str) -> bytes:
    return json.dumps([{"run": run, "rank": 0, "time": 1.0, "step": 1} for run in runs]).encode()


def test_each_decoder_remembers_only_the_run_names_it_decoded() -> None:
    first, second = Decoder(), Decoder()
    assert len(first.decode_body(body("job-a", "job-b"), "application/json").records) == 2
    assert first.runs.good == {"job-a", "job-b"}
    assert second.runs.good == set()


def test_two_services_share_no_decoder_state() -> None:
    one, two = Service(Settings()), Service(Settings())
    assert one.ingest(body("job-a"), "application/json").status == 200
    assert one.decoder.runs.good == {"job-a"} and two.decoder.runs.good == set()


def test_a_bad_run_name_is_refused_and_never_remembered() -> None:
    decoder = Decoder()
    decoder.decode_body(body("ok"), "application/json")
    out = decoder.decode_body(body("ok", "bad name"), "application/json")
    assert [r.run for r in out.records] == ["ok"]
    assert [(r.index, r.field) for r in out.rejected] == [(1, "run")]
    assert decoder.runs.good == {"ok"}


def test_the_cache_is_bounded_and_a_full_cache_still_checks_every_name() -> None:
    decoder = Decoder(max_run_names=3)
    names = [f"run-{i}" for i in range(7)]
    out = decoder.decode_body(body(*names, "no/slash"), "application/json")
    assert [r.run for r in out.records] == names
    assert [r.field for r in out.rejected] == ["run"]
    assert 1 <= len(decoder.runs.good) <= 3


def test_ndjson_lines_and_replay_lines_go_through_the_same_cache() -> None:
    decoder = Decoder()
    line: dict[str, Any] = {"run": "lines", "rank": 1, "time": 2.0, "step": 3, "loss": "NaN"}
    decoder.decode_body(json.dumps(line).encode(), "application/x-ndjson")
    assert decoder.runs.good == {"lines"}
    assert decoder.decode_record(json.dumps({**line, "run": "replayed"})).run == "replayed"
    assert decoder.runs.good == {"lines", "replayed"}


def test_check_and_from_obj_without_a_cache_still_check_the_name() -> None:
    names = RunNames()
    rec = from_obj({"run": "fine", "rank": 0, "time": 1.0, "step": 0}, names)
    assert names.good == {"fine"}
    rec.run = "not fine"
    with pytest.raises(RecordError, match=r"^run: must be 1-128 characters"):
        check(rec)
    with pytest.raises(RecordError, match=r"^run: must be 1-128 characters"):
        check(rec, names)


@pytest.mark.parametrize("phase_time", ["-5", "1e999"])
def test_a_known_run_name_does_not_let_a_bad_phase_time_through(phase_time: str) -> None:
    """The array fast path applies all of check()'s rules, also once the run name is remembered."""
    decoder = Decoder()
    decoder.decode_body(body("a"), "application/json")
    raw = ('[{"run": "a", "rank": 0, "time": 1, "step": 1, "type": "heartbeat", "phase": "step", '
           f'"phase_time": {phase_time}}}]').encode()
    out = decoder.decode_body(raw, "application/json")
    assert out.records == []
    assert [(r.field, r.reason.split(",")[0]) for r in out.rejected] == [("phase_time", "must be finite unix seconds")]
