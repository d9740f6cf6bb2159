"""docs/record.md's record contract, field by field, and the gaps a new user's client falls into."""

from __future__ import annotations

import gzip
import json
import math

import pytest
from trainhealth.ingest import BodyError, decode_body
from trainhealth.record import Record, RecordError, from_obj
from trainhealth.replay import ReadStats, read_file
from trainhealth.state import MAX_METRICS_KEPT, RankState
from trainhealth.status import rank_view

BASE = {"run": "job-1", "rank": 0, "time": 1700000000.5, "step": 3}


def rec(**kw):
    return {**BASE, **kw}


def verdicts(raw: bytes, ctype: str | None = "application/json") -> tuple[list[int], list[tuple[int, str]]]:
    out = decode_body(raw, ctype)
    return out.indexes, [(r.index, r.field) for r in out.rejected]


def reason(obj) -> tuple[str, str]:
    with pytest.raises(RecordError) as info:
        from_obj(obj)
    return info.value.field, info.value.reason


# -- run: 1-128 chars of [A-Za-z0-9._:-] ------------------------------------------------------------------
@pytest.mark.parametrize("run", ["a", "job-7", "A.b_c:d-9", "r" * 128])
def test_run_names_of_the_charset_up_to_128_chars_are_taken(run):
    assert from_obj(rec(run=run)).run == run


@pytest.mark.parametrize("run", ["", "r" * 129, "a b", "x/y", "é", "job\n", "job\r\n", "\njob"])
def test_run_names_outside_the_charset_are_rejected_with_the_rule(run):
    field, why = reason(rec(run=run))
    rule = "must be 1-128 characters of [A-Za-z0-9._:-]"
    want = rule if 1 <= len(run) <= 128 else f"{rule}, got {len(run)} characters (value: "
    assert field == "run" and why.startswith(want)


def test_run_name_with_a_trailing_newline_is_rejected_on_the_fast_path_too():
    assert verdicts(json.dumps([rec(run="job\n"), rec()]).encode()) == ([1], [(0, "run")])


# -- type, step ---------------------------------------------------------------------------------------------
def test_type_defaults_to_sample_also_when_sent_as_null():
    assert from_obj(rec()).type == "sample"
    assert from_obj(rec(type=None)).type == "sample"
    assert verdicts(json.dumps([rec(type=None)]).encode()) == ([0], [])


def test_unknown_type_names_the_allowed_ones():
    assert reason(rec(type="Sample")) == (
        "type", "must be one of sample, start, heartbeat, oom, end (value: 'Sample')")


@pytest.mark.parametrize("kind", ["sample", "heartbeat", "oom", "end"])
def test_step_is_required_but_for_start(kind):
    obj = {k: v for k, v in rec(type=kind).items() if k != "step"}
    assert reason(obj) == ("step", f"required for a {kind!r} record, got null")
    assert from_obj({**obj, "type": "start"}).step is None


@pytest.mark.parametrize("field,value", [("rank", -1), ("rank", 1.0), ("rank", True), ("rank", "0"),
                                         ("step", -1), ("step", 2.0), ("time", "1700000000"), ("time", -1.0),
                                         ("time", "nan"), ("batch_size", 32.5), ("world_size", "8")])
def test_wrong_type_or_range_of_a_common_field_is_rejected_naming_it(field, value):
    assert reason(rec(**{field: value}))[0] == field


# -- numbers: JSON numbers, bare NaN/Infinity tokens, non-finite strings in any case with a sign -----------
@pytest.mark.parametrize("text", ["nan", "NaN", "NAN", "+nan", "-nan", "inf", "+inf", "-inf", "Inf", "+INF",
                                  "infinity", "Infinity", "-Infinity", "+iNfInItY"])
def test_every_nonfinite_spelling_is_taken_in_number_fields_and_metrics(text):
    r = from_obj(rec(loss=text, reference_lr=text, metrics={"nan_count": text}))
    want = float(text)
    for got in (r.loss, r.reference_lr, r.metrics["nan_count"]):
        assert isinstance(got, float) and (math.isnan(got) if math.isnan(want) else got == want)


@pytest.mark.parametrize("text", ["0.5", "1e3", "", "nan ", " inf", "infinit", "NaNa", "null", "None"])
def test_other_strings_are_never_coerced_and_the_reason_says_what_is_taken(text):
    field, why = reason(rec(loss=text))
    assert field == "loss" and why.startswith("must be a number or null") and repr(text) in why


def test_null_is_not_measured_everywhere():
    r = from_obj(rec(loss=None, lr=None, metrics={"acc": None}, batch_size=None))
    assert (r.loss, r.lr, r.metrics, r.batch_size) == (None, None, {"acc": None}, None)


def test_a_bad_metric_is_named_with_its_value():
    assert reason(rec(metrics={"acc": 0.5, "top5": "0.9"}))[0] == "metrics.top5"
    assert "'0.9'" in reason(rec(metrics={"acc": 0.5, "top5": "0.9"}))[1]
    assert reason(rec(metrics={"nested": {"a": 1}}))[0] == "metrics.nested"
    field, why = reason(rec(metrics={"k" * 129: 1.0}))
    assert field == "metrics" and why.startswith("metric names are at most 128 characters (name: 'kkk")
    assert reason(rec(metrics=[1.0]))[0] == "metrics"


def test_bad_metric_is_named_on_the_wire_too():
    assert verdicts(json.dumps([rec(metrics={"m": "x"}), rec()]).encode()) == ([1], [(0, "metrics.m")])


# -- unknown fields ---------------------------------------------------------------------------------------
def test_unknown_fields_of_any_shape_are_ignored():
    r = from_obj(rec(future_field={"deep": [1, {"x": None}]}, Loss="text", tokens_per_second=1e6))
    assert r == Record(**{k: v for k, v in BASE.items()})


# -- body shapes --------------------------------------------------------------------------------------------
def test_pretty_printed_single_object_is_one_record():
    raw = json.dumps(rec(loss=math.nan), indent=2).encode()
    out = decode_body(raw, "application/json")
    assert out.indexes == [0] and out.rejected == [] and math.isnan(out.records[0].loss)


def test_pretty_printed_bad_object_is_one_rejection():
    assert verdicts(json.dumps(rec(rank=-1), indent=2).encode()) == ([], [(0, "rank")])


def test_ndjson_line_holding_two_objects_is_one_bad_line_not_two_records():
    raw = (json.dumps(rec(step=1)) + "," + json.dumps(rec(step=2)) + "\n" + json.dumps(rec(step=3))).encode()
    out = decode_body(raw, "application/x-ndjson")
    assert [(r.index, r.field) for r in out.rejected] == [(0, "$")]
    assert out.indexes == [1] and out.records[0].step == 3


def test_ndjson_record_split_over_two_lines_is_two_bad_lines_not_one_record():
    whole = json.dumps(rec(step=9))
    cut = whole.index('"time"')
    raw = (whole[:cut] + "\n" + whole[cut:] + "\n" + json.dumps(rec(step=10))).encode()
    out = decode_body(raw, "application/x-ndjson")
    assert [r.index for r in out.rejected] == [0, 1] and [r.step for r in out.records] == [10]
    assert out.indexes == [2]


def test_integer_past_pythons_digit_limit_costs_only_its_record():
    huge = "9" * 5000
    raw = b'[{"run":"j","rank":0,"time":1,"step":1,"rank2":' + huge.encode() + b'},' \
          b'{"run":"j","rank":' + huge.encode() + b',"time":1,"step":2,"loss":NaN},' \
          b'{"run":"j","rank":0,"time":1,"step":3,"loss":NaN}]'
    out = decode_body(raw, "application/json")
    assert out.indexes == [0, 2] and [(r.index, r.field) for r in out.rejected] == [(1, "rank")]
    ndjson = b'{"run":"j","rank":0,"time":1,"step":' + huge.encode() + b',"loss":NaN}\n' \
             b'{"run":"j","rank":0,"time":1,"step":4}'
    out = decode_body(ndjson, "application/x-ndjson")
    assert out.indexes == [1] and [(r.index, r.field) for r in out.rejected] == [(0, "step")]


def test_gzip_of_several_members_loses_no_record_and_trailing_junk_is_a_400():
    a, b = (json.dumps(rec(step=s)).encode() + b"\n" for s in (1, 2))
    out = decode_body(gzip.compress(a) + gzip.compress(b), "application/x-ndjson", "gzip")
    assert [r.step for r in out.records] == [1, 2]
    with pytest.raises(BodyError) as info:
        decode_body(gzip.compress(a) + b"junk", "application/x-ndjson", "gzip")
    assert info.value.status == 400 and "not valid gzip" in str(info.value)


def test_array_sent_as_ndjson_is_told_to_use_application_json():
    out = decode_body(json.dumps([rec(), rec()]).encode(), "application/x-ndjson")
    assert out.records == [] and [(r.index, r.field) for r in out.rejected] == [(0, "$")]
    assert "send an array as application/json" in out.rejected[0].reason


def test_utf8_byte_order_mark_is_skipped():
    assert verdicts(b"\xef\xbb\xbf" + json.dumps([rec()]).encode()) == ([0], [])
    assert verdicts(b"\xef\xbb\xbf" + json.dumps(rec()).encode(), "application/x-ndjson") == ([0], [])


def test_curl_default_form_content_type_gets_a_hint():
    with pytest.raises(BodyError) as info:
        decode_body(json.dumps(rec()).encode(), "application/x-www-form-urlencoded")
    assert info.value.status == 415 and "-H 'content-type: application/json'" in str(info.value)


# -- state and replay ----------------------------------------------------------------------------------------
def test_rank_state_keeps_a_bounded_number_of_metric_names():
    state = RankState(rank=0)
    state.apply(from_obj(rec(metrics={f"m{i}": float(i) for i in range(1000)})))
    assert len(state.metrics) == MAX_METRICS_KEPT and state.metrics["m0"] == 0.0
    state.apply(from_obj(rec(step=4, metrics={"m0": 5.0, "new": 1.0})))
    assert state.metrics["m0"] == 5.0 and "new" not in state.metrics


def test_replay_reader_names_json_errors_and_reads_huge_ints_per_line(tmp_path):
    path = tmp_path / "r.jsonl.gz"
    lines = ["not json", json.dumps(rec(step=1)), '{"run":"j","rank":0,"time":1,"step":' + "9" * 5000 + "}",
             json.dumps(rec(step=2, loss=math.nan))]
    path.write_bytes(gzip.compress("\n".join(lines).encode()))
    stats = ReadStats()
    assert [r.step for r in read_file(str(path), stats)] == [1, 2]
    assert stats.skipped == 2 and stats.first_errors[0].endswith(":1: not valid JSON: Expecting value: "
                                                                 "line 1 column 1 (char 0)")
    assert ":3: step: Expected `int | null`, got `float` (value: inf)" in stats.first_errors[1]


# -- phase, phase_time: what the training thread is doing ------------------------------------------------
@pytest.mark.parametrize("phase", ["data", "step", "a", "eval_2-x", "p" * 32])
def test_phase_names_of_the_charset_up_to_32_chars_are_taken(phase):
    got = from_obj(rec(type="heartbeat", phase=phase, phase_time=1700000000.25))
    assert (got.phase, got.phase_time) == (phase, 1700000000.25)
    assert verdicts(json.dumps([rec(type="heartbeat", phase=phase)]).encode()) == ([0], [])


@pytest.mark.parametrize("phase", ["", "p" * 33, "Data", "data loading", "data\n", "daté", "a.b"])
def test_phase_names_outside_the_charset_are_rejected_naming_the_field(phase):
    assert reason(rec(type="heartbeat", phase=phase)) == (
        "phase", f"must be 1-32 characters of [a-z0-9_-] (value: {phase!r})")
    assert verdicts(json.dumps([rec(type="heartbeat", phase=phase), rec()]).encode()) == ([1], [(0, "phase")])


@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0, "1700000000", True])
def test_phase_time_must_be_finite_unix_seconds(value):
    field, _ = reason(rec(type="heartbeat", phase="data", phase_time=value))
    assert field == "phase_time"


def test_rank_state_keeps_the_phase_of_its_newest_heartbeat_or_sample():
    state = RankState(rank=0)
    state.apply(from_obj(rec(type="heartbeat", time=10.0, phase="data", phase_time=9.5)))
    assert (state.phase, state.phase_time) == ("data", 9.5)
    state.apply(from_obj(rec(type="heartbeat", time=9.0, phase="step", phase_time=8.0)))  # arrived late
    assert (state.phase, state.phase_time) == ("data", 9.5)
    state.apply(from_obj(rec(time=11.0, step=4)))  # a sample without phase: the step ended
    assert (state.phase, state.phase_time) == (None, None)
    state.apply(from_obj(rec(type="heartbeat", time=12.0, phase="step", phase_time=11.5)))
    view = rank_view(state, detail=False)
    assert (view["phase"], view["phase_time"]) == ("step", 11.5)
    state.apply(from_obj(rec(type="start", time=13.0, step=None)))
    assert (state.phase, state.phase_time) == (None, None)
