"""Body decoding: encodings, non-finite numbers, per-record rejection, whole-body errors."""

from __future__ import annotations

import gzip
import json
import math

import pytest
from trainhealth.ingest import BodyError, decode_body

BASE = {"run": "job-1", "rank": 0, "time": 1700000000.5, "step": 3}


def rec(**kw):
    return {**BASE, **kw}


def body(records) -> bytes:
    return json.dumps(records).encode()


def test_clean_array_takes_fast_path_and_keeps_every_field():
    r = rec(loss=0.5, lr=0.01, grad_norm=2.0, batch_size=2, world_size=8, metrics={"acc": 0.9})
    out = decode_body(body([r]), "application/json")
    assert out.rejected == []
    got = out.records[0]
    assert (got.run, got.rank, got.step, got.type) == ("job-1", 0, 3, "sample")
    assert (got.loss, got.lr, got.grad_norm, got.batch_size, got.world_size) == (0.5, 0.01, 2.0, 2, 8)
    assert got.metrics == {"acc": 0.9}


@pytest.mark.parametrize("token,sign", [("NaN", 0), ("Infinity", 1), ("-Infinity", -1)])
def test_bare_nonfinite_tokens_arrive_as_nonfinite_floats(token, sign):
    raw = ('[{"run":"j","rank":1,"time":5,"step":7,"loss":%s,"grad_norm":%s}]' % (token, token)).encode()
    out = decode_body(raw, "application/json")
    assert out.rejected == []
    for value in (out.records[0].loss, out.records[0].grad_norm):
        assert value is not None and not math.isfinite(value)
        if sign == 0:
            assert math.isnan(value)
        else:
            assert value == sign * math.inf


@pytest.mark.parametrize("text,expect", [
    ("nan", "nan"), ("NaN", "nan"), ("inf", math.inf), ("-Inf", -math.inf), ("+inf", math.inf),
    ("Infinity", math.inf), ("-infinity", -math.inf), ("INF", math.inf),
])
def test_nonfinite_strings_arrive_as_nonfinite_floats(text, expect):
    out = decode_body(body([rec(loss=text, metrics={"m": text})]), "application/json")
    assert out.rejected == []
    loss = out.records[0].loss
    metric = out.records[0].metrics["m"]
    for value in (loss, metric):
        assert isinstance(value, float)
        if expect == "nan":
            assert math.isnan(value)
        else:
            assert value == expect


def test_null_stays_not_measured_and_never_becomes_nan():
    out = decode_body(body([rec(loss=None, grad_norm=None)]), "application/json")
    assert out.records[0].loss is None and out.records[0].grad_norm is None


def test_nan_survives_ndjson_and_gzip():
    raw = b'{"run":"j","rank":0,"time":1,"step":1,"loss":NaN}\n{"run":"j","rank":0,"time":2,"step":2,"loss":"-inf"}\n'
    out = decode_body(gzip.compress(raw), "application/x-ndjson", "gzip")
    assert math.isnan(out.records[0].loss)
    assert out.records[1].loss == -math.inf


def test_bad_records_are_rejected_with_index_field_and_value_while_good_ones_pass():
    batch = [
        rec(loss=1.0),
        rec(rank=-3),
        rec(run="has space"),
        {k: v for k, v in BASE.items() if k != "step"},
        rec(loss="0.5"),
        rec(loss=True),
        rec(type="bogus"),
        rec(step=1.5),
        "not an object",
        rec(time=math.inf),
        rec(loss=2.0),
    ]
    out = decode_body(body(batch), "application/json")
    assert [r.loss for r in out.records] == [1.0, 2.0]
    assert out.indexes == [0, 10]
    got = {(r.index, r.field) for r in out.rejected}
    assert got == {(1, "rank"), (2, "run"), (3, "step"), (4, "loss"), (5, "loss"), (6, "type"),
                   (7, "step"), (8, "$"), (9, "time")}
    by_index = {r.index: r.reason for r in out.rejected}
    assert "-3" in by_index[1]
    assert "'0.5'" in by_index[4]  # the string is not coerced to a number
    assert "required" in by_index[3]


def test_missing_required_fields_are_named():
    out = decode_body(body([{"rank": 0, "time": 1, "step": 1}, {"run": "a", "time": 1, "step": 1},
                            {"run": "a", "rank": 0, "step": 1}]), "application/json")
    assert [(r.index, r.field) for r in out.rejected] == [(0, "run"), (1, "rank"), (2, "time")]


def test_start_record_needs_no_step():
    out = decode_body(body([{"type": "start", "run": "a", "rank": 0, "time": 1, "lr": 0.02,
                             "world_size": 8, "batch_size": 2}]), "application/json")
    assert out.rejected == [] and out.records[0].step is None


def test_unknown_fields_are_ignored():
    out = decode_body(body([rec(future_field={"x": [1, 2]}, another="y")]), "application/json")
    assert len(out.records) == 1 and out.rejected == []


def test_ndjson_corrupt_line_costs_only_itself():
    raw = b'{"run":"j","rank":0,"time":1,"step":1}\n{"run":"j","rank":0,"ti\n{"run":"j","rank":0,"time":2,"step":2}\n'
    out = decode_body(raw, "application/x-ndjson")
    assert [r.step for r in out.records] == [1, 2]
    assert [(r.index, r.field) for r in out.rejected] == [(1, "$")]


def test_single_object_is_a_batch_of_one():
    out = decode_body(json.dumps(rec()).encode(), "application/json")
    assert len(out.records) == 1


@pytest.mark.parametrize("raw,ctype,cenc,status", [
    (b"[{\"run\":\"a\",", "application/json", None, 400),  # truncated JSON
    (b"", "application/json", None, 400),
    (b"12", "application/json", None, 400),
    (b"[1]", "application/xml", None, 415),
    (b"[1]", "application/json", "br", 415),
    (b"not gzip", "application/json", "gzip", 400),
    (b"[" * 100000 + b"]" * 100000, "application/json", None, 400),  # deep nesting
], ids=["truncated", "empty", "number", "xml", "brotli", "not-gzip", "deep-nesting"])
def test_whole_body_errors_have_a_status_and_a_message(raw, ctype, cenc, status):
    with pytest.raises(BodyError) as err:
        decode_body(raw, ctype, cenc)
    assert err.value.status == status
    assert str(err.value)


def test_deeply_nested_array_body_is_a_400():
    nested = "[" * 5000 + "]" * 5000
    raw = ('[{"run":"a","rank":0,"time":1,"step":1,"config":{"x":%s}}]' % nested).encode()
    with pytest.raises(BodyError) as err:
        decode_body(raw, "application/json")
    assert err.value.status == 400 and "nested too deeply" in str(err.value)


def test_deeply_nested_ndjson_line_is_a_record_error_not_a_crash():
    nested = "[" * 5000 + "]" * 5000
    raw = ('{"run":"a","rank":0,"time":1,"step":1,"config":{"x":%s}}\n{"run":"a","rank":0,"time":1,"step":2}\n'
           % nested).encode()
    out = decode_body(raw, "application/x-ndjson")
    assert [r.step for r in out.records] == [2]
    assert [r.index for r in out.rejected] == [0]


def test_too_many_records_is_413():
    with pytest.raises(BodyError) as err:
        decode_body(body([rec()] * 11), "application/json", max_records=10)
    assert err.value.status == 413 and "11 records" in str(err.value)


def test_gzip_bomb_is_413():
    bomb = gzip.compress(b"[" + b" " * (2 << 20) + b"]")
    with pytest.raises(BodyError) as err:
        decode_body(bomb, "application/json", "gzip", max_decoded_bytes=1 << 20)
    assert err.value.status == 413


def test_huge_strings_are_rejected_by_field():
    out = decode_body(body([rec(run="x" * 129), rec(optimizer="y" * 5000), rec(host="h")]), "application/json")
    assert [(r.index, r.field) for r in out.rejected] == [(0, "run"), (1, "optimizer")]
    assert len(out.records) == 1
