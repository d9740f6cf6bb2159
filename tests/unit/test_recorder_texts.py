"""The flight recorder writes each record's JSON text as the ingest body held it (ingest.Decoder's
``keep_texts``), not the record encoded again: byte for byte what the client sent for every record taken and
nothing of one refused; a NaN sent as a bare token or a string stays NaN; a body Python's json had to read
(NaN in an array) or one whose elements span lines is encoded as before; and ``trainhealth replay`` of the
files gives the alerts of the records themselves."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import msgspec
import pytest
from trainhealth.assembly import build_service
from trainhealth.cli import main as cli_main
from trainhealth.config import Settings, default_detector_settings, load
from trainhealth.ingest import Decoder
from trainhealth.pipeline import Pipeline, replay
from trainhealth.record import Record, from_obj, to_obj
from trainhealth.recorder import FlightRecorder
from trainhealth.replay import ReadStats, read_files
from trainhealth.service import Service
from trainhealth.trainer.transport import encode_json

from tests import live_traces as lt
from tests import page_traces as pt

T0 = 1_000_000.0


def served(tmp_path: Path, clock: float = T0 + 100, max_ranks: int | None = None) -> tuple[Service, FlightRecorder]:
    """A Service wired as assembly.py wires it with a flight recorder (record writer, texts kept)."""
    settings = Settings()
    if max_ranks is not None:
        settings.limits.max_ranks_per_run = max_ranks
    recorder = FlightRecorder(tmp_path)
    return Service(settings, clock=lambda: clock, record_writers=[recorder.write], keep_texts=True), recorder


def read_back(path: Path) -> list[Record]:
    stats = ReadStats()
    records = list(read_files([str(path)], stats))
    assert stats.skipped == 0
    return records


def same(a: list[Record], b: list[Record]) -> bool:
    """Field for field, NaN equal to NaN (the records' own == says NaN != NaN)."""
    return [json.dumps(to_obj(r), sort_keys=True) for r in a] == [json.dumps(to_obj(r), sort_keys=True) for r in b]


def test_an_array_body_is_recorded_as_its_texts_byte_for_byte_and_refused_records_are_not(tmp_path: Path) -> None:
    texts = [
        b'{"step":1,"run":"a","rank":0,"time":1000000.0,"loss":2.5,"extra":{"x":[1,{"y":"}\\n,{"}]}}',
        b'{"run":"b","rank":0,"time":1000000.5,"step":1,"loss":null,"lr":1e-3,"host":"n\xc3\xa9"}',
        b'{"run":"a b","rank":0,"time":1000001.0,"step":3}',  # refused by the decoder (its checks)
        b'{"run":"a","rank":0,"time":2000000.0,"step":2}',  # from the future
        b'{"run":"a","rank":2,"time":1000001.0,"step":2}',  # past limits.max_ranks_per_run
        b'{"run":"b","rank":0,"time":1000001.5,"step":2,"type":"heartbeat","phase":"data","phase_time":1000001.25}',
    ]
    service, recorder = served(tmp_path, max_ranks=1)
    answer = service.ingest(b"[" + b" ,\t".join(texts) + b" ]", "application/json")
    recorder.close()
    assert (answer.status, answer.body["accepted"]) == (200, 3)
    assert [(e["index"], e["field"]) for e in answer.body["errors"]] == [(2, "run"), (3, "time"), (4, "rank")]
    assert (tmp_path / "a.jsonl").read_bytes() == texts[0] + b"\n"
    assert (tmp_path / "b.jsonl").read_bytes() == texts[1] + b"\n" + texts[5] + b"\n"
    live = Decoder().decode_body(b"[" + b",".join(texts[i] for i in (0, 1, 5)) + b"]").records
    assert same(read_back(tmp_path / "a.jsonl") + read_back(tmp_path / "b.jsonl"), [live[0], live[1], live[2]])
    assert read_back(tmp_path / "b.jsonl")[0].loss is None


def test_an_ndjson_body_is_recorded_line_for_line_and_nan_stays_nan(tmp_path: Path) -> None:
    lines = [b'{"run":"n","rank":0,"time":1000000.0,"step":1,"loss":NaN,"grad_norm":"-inf"}',
             b'{"run":"n","rank":0,"time":1000001.0,"step":2,"loss":1.5,"metrics":{"m":"Infinity","k":null}}',
             b'{"run":"n","rank":0,"time":1000002.0,"step":"bad"}',
             b' {"run":"n","rank":0,"time":1000003.0,"step":3,"loss":-Infinity} ']
    service, recorder = served(tmp_path)
    body = lines[0] + b"\r\n\n" + lines[1] + b"\r\n" + lines[2] + b"\n" + lines[3]
    answer = service.ingest(body, "application/x-ndjson")
    recorder.close()
    assert (answer.status, answer.body["accepted"], answer.body["rejected"]) == (200, 3, 1)
    assert (tmp_path / "n.jsonl").read_bytes() == b"\n".join([lines[0], lines[1], lines[3]]) + b"\n"
    first, second, third = read_back(tmp_path / "n.jsonl")
    assert math.isnan(first.loss or 0.0) and first.grad_norm == -math.inf
    assert second.metrics == {"m": math.inf, "k": None} and third.loss == -math.inf


@pytest.mark.parametrize("kind", ["nan in an array", "elements span lines"])
def test_bodies_without_one_line_texts_are_encoded_with_type_and_nan_kept(tmp_path: Path, kind: str) -> None:
    objs = [{"run": "e", "rank": 0, "time": T0, "step": 1, "loss": math.nan if kind == "nan in an array" else 1.0},
            {"run": "e", "rank": 0, "time": T0 + 1, "step": 2, "type": "heartbeat"}]
    body = encode_json(objs) if kind == "nan in an array" else json.dumps(objs, indent=1).encode()
    service, recorder = served(tmp_path)
    assert service.ingest(body, "application/json").body["accepted"] == 2
    recorder.close()
    got = [json.loads(ln) for ln in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert [list(o)[:4] for o in got] == [["run", "rank", "time", "type"]] * 2
    assert same(read_back(tmp_path / "e.jsonl"), [from_obj(o) for o in objs])
    if kind == "nan in an array":
        assert '"loss":NaN' in (tmp_path / "e.jsonl").read_text()


def test_the_served_sidecar_keeps_texts_only_with_a_flight_recorder(tmp_path: Path) -> None:
    with_recorder, _ = build_service(load(None, {"db": os.path.join(tmp_path, "a.db"),
                                                 "record_dir": os.path.join(tmp_path, "rec")}, {}))
    without, _ = build_service(load(None, {"db": os.path.join(tmp_path, "b.db")}, {}))
    try:
        assert (with_recorder.decoder.keep_texts, without.decoder.keep_texts) == (True, False)
    finally:
        with_recorder.close()
        without.close()


@pytest.mark.parametrize("name", ["stalled", "diverging"])
def test_replay_of_the_recorded_texts_gives_the_alerts_of_the_records(name: str, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """``stalled`` goes as compact arrays (msgspec's texts), ``diverging`` (NaN losses) as NDJSON."""
    if name == "stalled":
        records = lt.ddp_job(4, 200, last_step={2: 120}, until=lt.T0 + 400).records
        bodies = [(msgspec.json.encode(records[i:i + 100]), "application/json") for i in range(0, len(records), 100)]
    else:
        objs = pt.diverging_run()
        records = [from_obj(o) for o in objs]
        bodies = [(b"\n".join(json.dumps(o).encode() for o in objs[i:i + 100]), "application/x-ndjson")
                  for i in range(0, len(objs), 100)]
    service, recorder = served(tmp_path, clock=max(r.time for r in records) + 1)
    for body, kind in bodies:
        answer = service.ingest(body, kind)
        assert (answer.status, answer.body["rejected"]) == (200, 0)
    recorder.close()
    files = sorted(str(p) for p in tmp_path.glob("*.jsonl"))
    assert same(list(read_files(files, ReadStats())), sorted(records, key=lambda r: r.time))
    assert cli_main(["replay", *files, "--until", "120"]) == 0
    got = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    want = list(replay(sorted(records, key=lambda r: r.time), Pipeline(default_detector_settings()), until=120.0,
                       refreshes=True))  # the CLI prints the refresh lines too
    assert want and [(a["alert"], a["state"], a["rank"], a["step"], a["summary"], a.get("refreshed")) for a in got] \
        == [(a["alert"], a["state"], a["rank"], a["step"], a["summary"], a.get("refreshed")) for a in want]
