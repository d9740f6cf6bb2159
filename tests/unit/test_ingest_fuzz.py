"""Property tests of the ingest path against an independent reading of docs/record.md's record contract.

Arbitrary JSON values and records (NaN, huge ints, unicode, nesting, wrong types per field), random bytes,
truncated bodies, gzip of random data and NDJSON with blank lines / CRLF go through ``decode_body`` and
``Service.ingest``: never an unexpected exception, every record accepted or rejected with index, field and
reason, counts add up, and an accepted record holds exactly what was sent (NaN stays NaN, null stays None,
no string becomes a number).
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trainhealth import jsonout
from trainhealth.config import Settings
from trainhealth.ingest import BodyError, decode_body
from trainhealth.record import NUMBER_FIELDS
from trainhealth.service import Service

SCALE = int(os.environ.get("FUZZ_SCALE", "1"))  # FUZZ_SCALE=20 for a longer hunt (all pass at 600 examples)
FUZZ = settings(max_examples=50 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(FUZZ, max_examples=25 * SCALE)  # examples that run the whole service

# -- the contract, written out independently of monitor/record.py ---------------------------------------
RUN_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
TYPES = ("sample", "start", "heartbeat", "oom", "end")
INT_FIELDS = ("batch_size", "world_size", "reference_batch_size", "warmup_steps", "pid")
TEXT_FIELDS = {"optimizer": 4096, "host": 4096, "message": 4096, "detail": 1 << 20}
NONFINITE = {"nan": math.nan, "inf": math.inf, "infinity": math.inf}
FLOAT_MAX_INT = 2**1024  # ints at or above this are out of a float's range


def nonfinite(text: str) -> float | None:
    sign, body = (-1.0, text[1:]) if text[:1] == "-" else (1.0, text[1:] if text[:1] == "+" else text)
    value = NONFINITE.get(body.lower())
    return None if value is None else sign * value


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def number_ok(v: Any) -> bool:
    if v is None or isinstance(v, float):
        return True
    if is_int(v):
        return abs(v) < FLOAT_MAX_INT
    return isinstance(v, str) and nonfinite(v) is not None


def record_type(obj: dict[str, Any]) -> Any:
    kind = obj.get("type")
    return "sample" if kind is None else kind  # absent or null: the default


def expected_valid(obj: Any) -> bool:
    """docs/record.md: is this decoded JSON value a usable record?"""
    if not isinstance(obj, dict):
        return False
    run, rank, time, kind = obj.get("run"), obj.get("rank"), obj.get("time"), record_type(obj)
    if not (isinstance(run, str) and RUN_RE.fullmatch(run) and run.strip(".")):
        return False
    if not (is_int(rank) and 0 <= rank < 2**31):
        return False
    if not ((isinstance(time, float) or is_int(time)) and number_ok(time) and math.isfinite(time) and time >= 0):
        return False
    if kind not in TYPES:
        return False
    step = obj.get("step")
    if step is None:
        if kind != "start":
            return False
    elif not (is_int(step) and 0 <= step < 2**63):
        return False
    for name in NUMBER_FIELDS:
        if not number_ok(obj.get(name)):
            return False
    for name in INT_FIELDS:
        v = obj.get(name)
        if v is not None and not (is_int(v) and 0 <= v < 2**63):
            return False
    for name, cap in TEXT_FIELDS.items():
        v = obj.get(name)
        if v is not None and not (isinstance(v, str) and len(v) <= cap and not unicode_broken(v)):
            return False
    if obj.get("config") is not None and not (isinstance(obj["config"], dict) and not unicode_broken(obj["config"])):
        return False
    metrics = obj.get("metrics")
    if metrics is not None:
        if not isinstance(metrics, dict):
            return False
        if not all(len(k) <= 128 and not unicode_broken(k) and number_ok(v) for k, v in metrics.items()):
            return False
    return True


def unicode_broken(value: Any) -> bool:
    """A string anywhere in ``value`` (keys too) holds a lone surrogate: no store can encode it."""
    if isinstance(value, str):
        return any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if isinstance(value, dict):
        return any(unicode_broken(k) or unicode_broken(v) for k, v in value.items())
    if isinstance(value, list):
        return any(unicode_broken(v) for v in value)
    return False


def same_number(sent: Any, got: Any) -> bool:
    if sent is None:
        return got is None
    if isinstance(sent, str):
        want = nonfinite(sent)
        assert want is not None, f"string {sent!r} was taken as a number"
        sent = want
    if not isinstance(got, float):
        return False
    return math.isnan(got) if math.isnan(sent) else got == float(sent)


def assert_holds_what_was_sent(obj: dict[str, Any], rec: Any) -> None:
    assert (rec.run, rec.rank, rec.type) == (obj["run"], obj["rank"], record_type(obj))
    assert rec.time == float(obj["time"]) and rec.step == obj.get("step")
    for name in NUMBER_FIELDS:
        assert same_number(obj.get(name), getattr(rec, name)), (name, obj.get(name), getattr(rec, name))
    for name in (*INT_FIELDS, *TEXT_FIELDS):
        assert getattr(rec, name) == obj.get(name)
    if obj.get("metrics") is None:
        assert rec.metrics is None
    else:
        assert rec.metrics.keys() == obj["metrics"].keys()
        for k, v in obj["metrics"].items():
            assert same_number(v, rec.metrics[k]), (k, v, rec.metrics[k])


# -- strategies ---------------------------------------------------------------------------------------
huge_ints = st.integers(min_value=-(10**400), max_value=10**400) | st.sampled_from([2**63, 2**31, 2**1024, -1])


def texts(max_size: int) -> st.SearchStrategy[str]:
    """Text, now and then with a lone surrogate (JSON's "\\udfff" escape: valid JSON, not valid Unicode)."""
    return st.text(max_size=max_size) | st.text(st.characters() | st.characters(categories=["Cs"]),
                                                  min_size=1, max_size=max_size)


scalars = (st.none() | st.booleans() | st.integers() | huge_ints
           | st.floats(allow_nan=True, allow_infinity=True) | texts(20))
json_values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4)
                           | st.dictionaries(texts(8), kids, max_size=4), max_leaves=6)
spellings = st.sampled_from(["nan", "NaN", "-nan", "+NaN", "inf", "-Inf", "+inf", "INFINITY", "-Infinity",
                             "0.5", "1e3", "", "nan ", "infinit", "null", "None", "٣"])
numbers = (st.none() | st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(10**6), 10**6)
           | spellings)
good_runs = (st.text("AZaz09._:-", min_size=1, max_size=3) | st.sampled_from([".", "..", "...", ".a"])
             | st.just("r" * 128) | st.just("r" * 129))
runs = st.sampled_from(["job-1", "job-2", "a:b.c_d"]) | good_runs | st.sampled_from(["abc\n", "a b", "", "x/y"])


def field_value(good: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly a plausible value for the field, sometimes anything at all."""
    return st.one_of(good, good, good, json_values)


record_fields = {
    "run": field_value(runs),
    "rank": field_value(st.integers(-2, 5)),
    "time": field_value(st.floats(0, 2e9) | st.integers(0, 2 * 10**9)),
    "type": field_value(st.sampled_from([*TYPES, "Sample", "other", None])),
    "step": field_value(st.integers(-1, 10**6)),
    **{name: field_value(numbers) for name in NUMBER_FIELDS},
    **{name: field_value(st.none() | st.integers(-1, 4096)) for name in INT_FIELDS},
    **{name: field_value(st.none() | texts(30)) for name in TEXT_FIELDS},
    "metrics": field_value(st.none() | st.dictionaries(texts(10), numbers, max_size=4)),
    "config": field_value(st.none() | st.dictionaries(texts(6), json_values, max_size=3)),
}
REQUIRED = ("run", "rank", "time", "step")


@st.composite
def records(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 19)) == 0:
        return draw(json_values)  # not even an object
    keys = [k for k in REQUIRED if draw(st.integers(0, 9)) > 0]  # a required field is sometimes missing
    keys += draw(st.lists(st.sampled_from(sorted(record_fields)), max_size=5, unique=True))
    obj = {k: draw(record_fields[k]) for k in keys}
    obj.update(draw(st.dictionaries(texts(12).filter(lambda k: k not in record_fields),
                                    json_values, max_size=2)))  # unknown fields
    return obj


def dumps(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


batches = st.lists(records(), max_size=6)


def check_counts(out: Any, items: list[Any]) -> None:
    seen = sorted(out.indexes + [r.index for r in out.rejected])
    assert seen == list(range(len(items))), "every record is either accepted or rejected, once"
    for r in out.rejected:
        assert isinstance(r.field, str) and r.field and isinstance(r.reason, str) and r.reason
    for i, rec in zip(out.indexes, out.records):
        assert expected_valid(items[i]), f"record {i} should have been rejected: {items[i]!r}"
        assert_holds_what_was_sent(items[i], rec)
    for r in out.rejected:
        assert not expected_valid(items[r.index]), f"record {r.index} wrongly rejected: {r.field}: {r.reason}"


# -- decode_body ------------------------------------------------------------------------------------------
@FUZZ
@given(batches)
def test_json_array_accepts_exactly_the_valid_records_and_keeps_their_values(items):
    check_counts(decode_body(dumps(items), "application/json"), items)


@FUZZ
@given(batches.filter(bool), st.sampled_from([b"\n", b"\r\n"]), st.lists(st.sampled_from([b"", b" ", b"\t"])))
def test_ndjson_with_blank_lines_and_crlf_counts_every_line(items, newline, blanks):
    lines = [dumps(i) for i in items]
    body = newline.join([*blanks, *(ln + newline + b for ln, b in zip(lines, blanks + [b""] * len(lines)))])
    check_counts(decode_body(body, "application/x-ndjson"), items)


@FUZZ
@given(records(), st.booleans(), st.sampled_from([None, "application/json"]))
def test_one_object_compact_or_pretty_is_a_batch_of_one(item, pretty, ctype):
    if not isinstance(item, dict):
        return
    body = json.dumps(item, indent=2 if pretty else None).encode()
    check_counts(decode_body(body, ctype), [item])


@FUZZ
@given(batches, st.sampled_from(["application/json", "application/x-ndjson"]), st.lists(st.floats(0, 1), max_size=3))
def test_gzip_body_in_one_or_several_members_decodes_like_the_plain_one(items, ctype, cuts):
    plain = dumps(items) if ctype == "application/json" else b"\n".join(dumps(i) for i in items)
    try:
        want = decode_body(plain, ctype)
    except BodyError as exc:  # an empty NDJSON body
        assert exc.status == 400
        return
    edges = [0, *sorted(int(c * len(plain)) for c in cuts), len(plain)]
    members = b"".join(gzip.compress(plain[a:b]) for a, b in zip(edges, edges[1:]))  # `cat a.gz b.gz`
    got = decode_body(members, ctype, "gzip")
    assert got.indexes == want.indexes
    assert [(r.index, r.field) for r in got.rejected] == [(r.index, r.field) for r in want.rejected]


@FUZZ
@given(st.binary(max_size=300) | json_values.map(dumps),
       st.sampled_from([None, "application/json", "application/x-ndjson", "text/plain", "image/png"]),
       st.sampled_from([None, "gzip", "identity", "br"]))
def test_any_bytes_give_records_or_a_body_error_never_a_crash(raw, ctype, cenc):
    try:
        out = decode_body(raw, ctype, cenc)
    except BodyError as exc:
        assert exc.status in (400, 413, 415) and str(exc)
        return
    assert len(out.records) == len(out.indexes)
    assert len(set(out.indexes) | {r.index for r in out.rejected}) == len(out.indexes) + len(out.rejected)


@FUZZ
@given(batches.filter(bool), st.data())
def test_truncated_body_is_a_400_or_loses_only_the_cut_line(items, data):
    body = dumps(items)
    cut = data.draw(st.integers(1, len(body) - 1))
    try:
        decode_body(body[:cut], "application/json")
        raise AssertionError("a cut JSON array was decoded")
    except BodyError as exc:
        assert exc.status == 400 and str(exc)
    lines = b"\n".join(dumps(i) for i in items)
    cut = data.draw(st.integers(1, len(lines)))
    try:
        out = decode_body(lines[:cut], "application/x-ndjson")
    except BodyError as exc:
        assert exc.status == 400
        return
    for i, line in enumerate(lines[:cut].split(b"\n")):
        if line == dumps(items[i]):  # a whole line keeps its verdict
            assert (i in out.indexes) == expected_valid(items[i]), items[i]


@FUZZ
@given(st.binary(min_size=0, max_size=200))
def test_gzip_of_random_bytes_is_a_body_error_or_decodes(raw):
    try:
        decode_body(gzip.compress(raw), "application/json", "gzip")
    except BodyError as exc:
        assert exc.status == 400


# -- Service.ingest: decoding, caps and every detector --------------------------------------------------
WALL = [1_800_000_000.0]  # the service's wall clock; tests move it


def make_service() -> Service:
    s = Settings()
    s.limits.max_runs = 4
    s.limits.max_ranks_per_run = 3
    s.limits.max_future_seconds = 1e300  # the future-time guard has its own test (test_server.py)
    WALL[0] = 1_800_000_000.0
    return Service(s, clock=lambda: WALL[0])


@SLOW
@given(st.lists(batches, min_size=1, max_size=4), st.sampled_from(["application/json", "application/x-ndjson"]))
def test_service_answers_every_batch_with_counts_that_add_up(sequence, ctype):
    service = make_service()
    for items in sequence:
        body = dumps(items) if ctype == "application/json" else b"\n".join(dumps(i) for i in items)
        answer = service.ingest(body, ctype)
        if answer.status in (400, 413, 415) and "error" in answer.body:
            assert not items or ctype == "application/x-ndjson" and not body.strip()
            continue
        b = answer.body
        assert b["accepted"] + b["rejected"] == len(items)
        assert b["accepted"] == sum(map(expected_valid, items)) - sum(
            1 for e in b.get("errors", []) if e["field"] in ("run", "rank") and "limits." in e["reason"])
        assert answer.status == (200 if b["accepted"] or not items else (429 if all(
            "limits." in e["reason"] for e in b["errors"]) else 400))
        assert sorted(e["index"] for e in b.get("errors", [])) == [e["index"] for e in b.get("errors", [])]
        json.dumps(b, allow_nan=False)  # the answer itself is plain JSON
    service.tick()
    assert service.pipeline.detector_errors == {}


# -- long runs with arbitrary values reach every detector's windows ---------------------------------------
ALERT_NAMES = {"nan_divergence", "loss_spike", "grad_explosion", "gpu_oom_risk", "gpu_oom", "host_memory_leak",
               "rank_stalled", "straggler", "lr_scaling"}
any_float = st.floats(allow_nan=True, allow_infinity=True) | st.floats(-10, 10) | st.none()
any_count = st.none() | st.integers(0, 2**63 - 1) | st.integers(0, 64)
mem = st.none() | st.floats(0, 2**50) | st.floats(allow_nan=True, allow_infinity=True) | st.integers(0, 2**40)
sample = st.fixed_dictionaries({}, optional={
    "loss": any_float, "grad_norm": any_float, "lr": any_float, "grad_scale": any_float,
    "batch_size": any_count, "world_size": any_count, "rank": st.integers(0, 2),
    "type": st.sampled_from(TYPES), "dt": st.floats(-100, 1e6) | st.just(0.0), "advance": st.integers(0, 1),
    "reference_lr": any_float, "reference_batch_size": any_count, "warmup_steps": any_count,
    "gpu_mem_peak_bytes": mem, "gpu_mem_total_bytes": mem, "gpu_mem_reserved_bytes": mem, "host_mem_bytes": mem,
    "host_mem_total_bytes": mem, "host_mem_available_bytes": mem, "step_time_seconds": any_float,
    "data_time_seconds": any_float})


@SLOW
@given(st.lists(sample, min_size=20, max_size=120))
def test_arbitrary_values_through_every_detector_give_well_formed_alerts(steps):
    service, t, step, out = make_service(), 1.7e9, 0, []
    for fields in steps:
        t = max(0.0, t + fields.pop("dt", 1.0))
        step += fields.pop("advance", 1)
        out.append({"run": "fuzz", "rank": fields.pop("rank", 0), "time": t, "step": step, **fields})
    answers = [service.ingest(dumps(out[i:i + 10]), "application/json") for i in range(0, len(out), 10)]
    assert sum(a.body["accepted"] for a in answers) == len(out)
    for idle in (0.0, 30.0, 600.0, 7 * 3600.0):  # time passes with no records: liveness, then expiry
        WALL[0] += idle
        service.tick()
    assert service.pipeline.detector_errors == {}  # a detector that raised (logged above) is a bug
    for alert in service.book.query(limit=10_000):
        assert alert["alert"] in ALERT_NAMES and alert["state"] in ("firing", "resolved")
        assert alert["severity"] in ("critical", "warning", "info") and alert["run"] == "fuzz"
        assert alert["rank"] is None or is_int(alert["rank"])
        assert is_int(alert["step"]) and isinstance(alert["time"], float)
        assert isinstance(alert["summary"], str) and alert["summary"]
        json.loads(jsonout.dumps(alert))  # printable as replay does, posted as webhooks do


# -- bombs: bodies far larger decoded than sent ------------------------------------------------------------
def json_value_count(value: Any) -> int:
    """Every JSON value in ``value``, containers and dict keys included (what a decoder builds objects for)."""
    if isinstance(value, dict):
        return 1 + sum(1 + json_value_count(v) for v in value.values())
    if isinstance(value, list):
        return 1 + sum(json_value_count(v) for v in value)
    return 1


@FUZZ
@given(st.integers(0, 3000), st.integers(1, 4), st.sampled_from(["top", "element", "config", "unknown", "ndjson"]),
       st.sampled_from([b"[]", b"{}", b"0", b"NaN"]), st.booleans())
def test_nested_array_bombs_are_refused_unread_past_the_value_limit(width, depth, where, leaf, gzipped):
    inner = leaf
    for _ in range(depth):
        inner = b"[" + b",".join([inner] * width) + b"]" if width else b"[]"
        width = min(width, 3)  # wide at the bottom, narrow above: up to ~3000*27 values
    record = b'{"run":"r","rank":0,"time":1,"type":"start"%s}'
    body = {"top": inner, "element": b"[" + inner + b"]",
            "config": b"[" + record % (b',"config":{"x":' + inner + b"}") + b"]",
            "unknown": b"[" + record % (b',"zz":' + inner) + b"]",
            "ndjson": b"\n".join([record % b""] * (len(inner) // 8))}[where]
    limit = 2000
    ctype = "application/x-ndjson" if where == "ndjson" else "application/json"
    try:
        out = decode_body(gzip.compress(body) if gzipped else body, ctype, "gzip" if gzipped else None,
                          max_values=limit, max_records=20_000, count_from=0)
    except BodyError as exc:
        assert exc.status in (400, 413), exc
        if exc.status == 413:
            assert "limits.max_values_per_batch" in str(exc) and len(body) > limit, exc
        return
    parsed = [json.loads(line) for line in body.splitlines()] if where == "ndjson" else json.loads(body)
    assert json_value_count(parsed) <= 2 * limit, "a body holding more values than the limit was decoded"
    assert sorted(out.indexes + [r.index for r in out.rejected]) == list(range(len(out.indexes) + len(out.rejected)))


def test_the_record_cap_stops_the_slow_path_as_it_reads():
    one = b'{"run":"r","rank":0,"time":1,"step":1,"loss":NaN}'  # bare NaN: the slow path
    body = b"[" + b",".join([one] * 101) + b",[[[[]]]], this is never read"
    with_cap = decode_body(b"[" + b",".join([one] * 100) + b"]", "application/json", max_records=100)
    assert len(with_cap.records) == 100 and math.isnan(with_cap.records[0].loss)
    try:
        decode_body(body, "application/json", max_records=100)
    except BodyError as exc:
        assert exc.status == 413 and "more than 100 records" in str(exc)
    else:
        raise AssertionError("101 records were taken with a cap of 100")
