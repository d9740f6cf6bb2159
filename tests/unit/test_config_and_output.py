"""Settings (file < env < flags), JSON output that never writes NaN as null, flight recorder, replay reading."""

from __future__ import annotations

import gzip
import json
import math

import pytest
from trainhealth import jsonout
from trainhealth.config import ConfigError, load
from trainhealth.record import from_obj
from trainhealth.recorder import FlightRecorder
from trainhealth.replay import ReadStats, read_file, read_files


def test_flags_beat_environment_beat_file(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[server]\nport = 1111\nhost = "0.0.0.0"\ndb = "file.db"\n')
    s = load(str(cfg), {"port": 3333}, {"TRAINHEALTH_PORT": "2222", "TRAINHEALTH_DB": "env.db"})
    assert (s.server.port, s.server.host, s.server.db) == (3333, "0.0.0.0", "env.db")


def test_defaults_bind_to_loopback():
    assert load(None, {}, {}).server.host == "127.0.0.1"


def test_webhooks_from_env_are_comma_separated():
    s = load(None, {}, {"TRAINHEALTH_WEBHOOK": "http://a/x,http://b/y"})
    assert s.server.webhooks == ["http://a/x", "http://b/y"]


@pytest.mark.parametrize("toml,needle", [
    ("[detectors.nan_divergence]\nenabld = true\n", "detectors.nan_divergence.enabld"),
    ("[detectors.nope]\n", "detectors.nope"),
    ("[limits]\nmax_runs = -1\n", "limits.max_runs"),
    ("[server]\nport = 70000\n", "port"),
    ("this is = not toml [", "not valid TOML"),
])
def test_bad_config_names_the_key(tmp_path, toml, needle):
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load(str(cfg), {}, {})


def test_bad_env_value_is_named():
    with pytest.raises(ConfigError, match="TRAINHEALTH_PORT"):
        load(None, {}, {"TRAINHEALTH_PORT": "eighty"})


def test_jsonout_writes_nonfinite_as_strings_never_null():
    text = jsonout.dumps({"a": math.nan, "b": [math.inf, -math.inf, 1.5, None]})
    assert json.loads(text) == {"a": "NaN", "b": ["Infinity", "-Infinity", 1.5, None]}


def test_recorder_round_trips_nan_and_rotates(tmp_path):
    rec = FlightRecorder(tmp_path, max_bytes=200)
    records = [from_obj({"run": "r1", "rank": 0, "time": i, "step": i, "loss": math.nan if i == 2 else 1.0})
               for i in range(6)]
    for r in records:
        rec.write([r])
    rec.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "r1.jsonl.1" in files
    stats = ReadStats()
    back = list(read_files([str(tmp_path / n) for n in reversed(files)], stats))
    assert sorted(r.step for r in back) == list(range(6))
    assert math.isnan(next(r for r in back if r.step == 2).loss)


def test_replay_reader_skips_corrupt_lines_and_reads_gzip(tmp_path):
    path = tmp_path / "r.jsonl.gz"
    lines = ['{"run":"r","rank":0,"time":1,"step":1,"loss":NaN}', "{corrupt", '{"run":"r","rank":-1,"time":1,"step":1}',
             "", '{"run":"r","rank":0,"time":2,"step":2}']
    path.write_bytes(gzip.compress("\n".join(lines).encode()))
    stats = ReadStats()
    got = list(read_file(str(path), stats))
    assert [r.step for r in got] == [1, 2] and math.isnan(got[0].loss)
    assert (stats.records, stats.skipped) == (2, 2)


def test_replay_reader_keeps_what_a_truncated_gzip_holds(tmp_path):
    path = tmp_path / "cut.jsonl.gz"
    data = gzip.compress("".join(f'{{"run":"r","rank":0,"time":{i},"step":{i}}}\n' for i in range(2000)).encode())
    path.write_bytes(data[: len(data) // 2])
    stats = ReadStats()
    got = list(read_file(str(path), stats))
    assert 0 < len(got) < 2000 and stats.skipped == 1


def test_jsonout_keeps_an_alert_with_an_odd_field():
    class Odd:
        def __repr__(self) -> str:
            return "<odd>"

    assert json.loads(jsonout.dumps({"a": {1, 2}, "b": Odd(), "c": math.nan})) == {"a": [1, 2], "b": "<odd>",
                                                                                   "c": "NaN"}


def test_bad_log_level_from_environment_is_named():
    from trainhealth.cli import main

    assert main(["serve", "--port", "0"], environ={"TRAINHEALTH_LOG_LEVEL": "loud"}) == 2
