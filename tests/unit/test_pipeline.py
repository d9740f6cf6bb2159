"""Pipeline, alert book, run state: ordering, caps, dedupe, reconfigure."""

from __future__ import annotations

import math

import pytest
from trainhealth.alerts import AlertBook
from trainhealth.config import Limits, default_detector_settings
from trainhealth.detectors.nan_divergence import NanDivergenceSettings
from trainhealth.events import firing, resolved
from trainhealth.pipeline import Pipeline
from trainhealth.record import from_obj


def sample(step, rank=0, run="r", t=None, **kw):
    return from_obj({"run": run, "rank": rank, "time": 1000.0 + (step if t is None else t), "step": step, **kw})


def test_nan_loss_fires_once_naming_step_and_rank():
    p = Pipeline(default_detector_settings())
    out = p.process([sample(s, loss=1.0) for s in range(5)] + [sample(5, loss=math.nan)]).alerts
    assert [(a["alert"], a["rank"], a["step"], a["state"], a["severity"]) for a in out] == [
        ("nan_divergence", None, 5, "firing", "critical")]
    assert "step 5 on rank 0" in out[0]["summary"]
    assert p.process([sample(6, loss=math.nan)]).alerts == []  # deduplicated while open


def test_out_of_order_batch_is_processed_by_step_then_time():
    p = Pipeline(default_detector_settings())
    batch = [sample(3, rank=1, loss=math.nan), sample(2, rank=0, loss=math.nan), sample(1, rank=0, loss=1.0)]
    out = p.process(batch).alerts
    # rank 0 went non-finite first (step 2); rank 1 followed at step 3: one alert names rank 0 first
    assert [(a["rank"], a["step"], a["first_rank"]) for a in out] == [(None, 2, 0)]
    assert out[0]["summary"].startswith("loss became nan at step 2 on rank 0 (its own loss)")
    assert p.runs["r"].ranks[0].last_step == 2


def test_null_loss_is_not_measured_and_stays_quiet():
    p = Pipeline(default_detector_settings())
    assert p.process([sample(s, loss=None, grad_norm=None) for s in range(10)]).alerts == []
    assert "loss" not in p.runs["r"].ranks[0].latest


def test_run_and_rank_caps_refuse_with_reasons():
    p = Pipeline(default_detector_settings(), Limits(max_runs=2, max_ranks_per_run=2))
    batch = [sample(1, run="a"), sample(1, run="b"), sample(1, run="c"), sample(1, run="a", rank=1),
             sample(1, run="a", rank=2)]
    out = p.process(batch)
    assert [(i, e.field) for i, e in out.refused] == [(2, "run"), (4, "rank")]
    assert sorted(p.runs) == ["a", "b"] and sorted(p.runs["a"].ranks) == [0, 1]


def test_ended_run_gives_way_at_the_run_cap_and_its_alerts_resolve():
    p = Pipeline(default_detector_settings(), Limits(max_runs=2))
    end = {"type": "end", "rank": 0, "time": 1010.0, "step": 2, "status": "completed"}
    ended = p.process([sample(1, run="a", loss=math.nan), from_obj({**end, "run": "a"})], wall=10.0).alerts
    # its every rank ended: its alert resolves then, saying so (nothing stays firing for a finished run)
    assert [(a["alert"], a["state"], a.get("resolved_by")) for a in ended] == [
        ("nan_divergence", "firing", None), ("nan_divergence", "resolved", "run_ended")]
    assert ended[1]["summary"] == "run ended completed at step 2"
    p.process([sample(1, run="b"), from_obj({**end, "run": "b"})], wall=20.0)
    out = p.process([sample(1, run="c")], wall=30.0)  # a sweep's next job: "a" ended longest ago
    assert out.refused == [] and sorted(p.runs) == ["b", "c"] and out.alerts == []
    p.process([sample(2, run="c")])
    refused = p.process([sample(1, run="d"), sample(1, run="e")]).refused  # "b" gives way, then no run has ended
    assert [(i, e.field) for i, e in refused] == [(1, "run")] and sorted(p.runs) == ["c", "d"]


def test_reconfigure_keeps_state_and_applies_new_thresholds():
    p = Pipeline(default_detector_settings())
    p.process([sample(1, loss=1.0)])
    p.reconfigure({**default_detector_settings(), "nan_divergence": NanDivergenceSettings(enabled=False)})
    assert p.process([sample(2, loss=math.nan)]).alerts == []
    assert p.runs["r"].ranks[0].last_step == 2


def test_expired_run_is_forgotten_and_its_alerts_resolve():
    p = Pipeline(default_detector_settings(), Limits(run_ttl_seconds=60))
    p.process([sample(1, loss=math.nan)], wall=500.0)
    assert p.tick_wall(550.0) == []
    out = p.tick_wall(561.0)
    assert [(a["alert"], a["state"]) for a in out] == [("nan_divergence", "resolved")]
    assert "r" not in p.runs and p.book.firing() == []


def test_end_record_marks_rank_and_run_ended():
    p = Pipeline(default_detector_settings())
    p.process([sample(1), from_obj({"type": "end", "run": "r", "rank": 0, "time": 1002, "step": 1})])
    assert p.runs["r"].ended and p.runs["r"].ranks[0].ended


def test_oom_record_is_kept_with_its_detail():
    p = Pipeline(default_detector_settings())
    p.process([from_obj({"type": "oom", "run": "r", "rank": 3, "time": 5, "step": 9,
                         "message": "CUDA out of memory", "detail": "|===| summary",
                         "gpu_mem_total_bytes": 8e9})])
    oom = p.runs["r"].ranks[3].last_oom
    assert oom["detail"] == "|===| summary" and oom["step"] == 9 and oom["gpu_mem_total_bytes"] == 8e9


def test_alert_book_fires_dedupes_resolves_and_refires():
    book = AlertBook()
    f = firing("x", 1, 10, 100.0, "bad", "critical", value=3)
    assert [a["state"] for a in book.apply("r", [f])] == ["firing"]
    assert book.apply("r", [firing("x", 1, 11, 101.0, "bad")]) == []
    assert book.open[("r", 1, "x")]["last_step"] == 11
    out = book.apply("r", [resolved("x", 1, 12, 102.0)])
    assert [(a["state"], a["started_at"], a["severity"]) for a in out] == [("resolved", 100.0, "critical")]
    assert out[0]["summary"] == "resolved: bad"
    assert book.apply("r", [resolved("x", 1, 13, 103.0)]) == []  # nothing open: ignored
    assert [a["state"] for a in book.apply("r", [f])] == ["firing"]
    assert [a["state"] for a in book.query(run="r")] == ["firing", "resolved", "firing"]
    assert len(book.query(state="firing")) == 1
    assert book.query(run="other") == []


@pytest.mark.parametrize("key,value", [("max_runs", 0), ("max_body_bytes", -1), ("max_ranks_per_run", True)])
def test_bad_limits_name_the_key_and_value(key, value):
    with pytest.raises(ValueError, match=f"limits.{key}"):
        Limits(**{key: value})


def test_a_detector_bug_is_counted_and_logged_but_fails_neither_the_batch_nor_the_other_detectors(caplog):
    from trainhealth.detectors import ALL, Detector

    class Broken(Detector):
        name = "nan_divergence"  # borrows a real detector's settings

        def update(self, record):
            raise ZeroDivisionError("bug")

        def tick(self, now):
            raise ZeroDivisionError("bug")

    p = Pipeline(default_detector_settings(), detectors=[Broken, *ALL])
    out = p.process([sample(s, loss=1.0) for s in range(3)] + [sample(3, t=10.0, loss=math.nan)])
    assert [(a["alert"], a["step"]) for a in out.alerts] == [("nan_divergence", 3)]  # the real one still fires
    assert p.runs["r"].ranks[0].last_step == 3 and p.records_processed == 4
    assert p.detector_errors == {"nan_divergence": 7}  # 4 updates and 3 ticks (record clock at 1001, 1002, 1010)
    assert "detector nan_divergence failed on run r rank 0 step 0 (1 times)" in caplog.text
