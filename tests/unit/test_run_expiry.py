"""Runs expire on the wall clock, counted from the batch that last moved their record clock."""

from __future__ import annotations

from trainhealth.config import Limits, default_detector_settings
from trainhealth.pipeline import Pipeline
from trainhealth.record import from_obj


def test_run_seen_in_one_batch_at_one_time_is_not_expired_at_the_next_tick() -> None:
    p = Pipeline(default_detector_settings(), Limits(run_ttl_seconds=60))
    p.process([from_obj({"run": "r1", "rank": 0, "time": 5.0, "step": 1, "loss": float("nan")})], wall=1000.0)
    assert p.tick_wall(1001.0) == []
    assert "r1" in p.runs
    (expired,) = p.tick_wall(1061.0)
    assert (expired["alert"], expired["state"]) == ("nan_divergence", "resolved")
    assert "r1" not in p.runs
