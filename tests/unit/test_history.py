"""The live page's per-rank history ring: bounded, newest kept, a NaN never confused with "not measured"."""

from __future__ import annotations

import math

from trainhealth.history import COLUMNS, POINTS, RankHistory, columns
from trainhealth.record import Record
from trainhealth.state import RankState


def sample(step: int, **values: float | None) -> Record:
    return Record(run="r", rank=0, time=1000.0 + step, step=step, **values)  # type: ignore[arg-type]


def test_ring_keeps_the_newest_points_and_stays_bounded() -> None:
    h = RankHistory(points=50)
    for step in range(1000):
        h.add(sample(step, loss=float(step)))
        assert len(h.rows) <= (50 + 50 // 4) * len(COLUMNS)
    cols = columns(h.copy())
    assert cols["step"] == [float(s) for s in range(950, 1000)]
    assert cols["loss"] == [float(s) for s in range(950, 1000)]
    assert cols["time"][-1] == 1999.0


def test_nan_and_infinity_stay_values_and_missing_stays_none() -> None:
    h = RankHistory()
    h.add(sample(1, loss=math.nan, lr=0.1, grad_norm=math.inf))
    h.add(sample(2, loss=None, lr=None, grad_norm=-math.inf, host_mem_bytes=5e9))
    h.add(sample(3, loss=float("-nan"), lr=0.1))
    cols = columns(h.copy())
    assert math.isnan(cols["loss"][0]) and cols["loss"][1] is None and math.isnan(cols["loss"][2])
    assert cols["lr"] == [0.1, None, 0.1]
    assert cols["grad_norm"] == [math.inf, -math.inf, None]
    assert cols["host_mem_bytes"] == [None, 5e9, None]
    assert cols["gpu_mem_peak_bytes"] == [None, None, None]


def test_rank_state_records_only_its_newest_samples() -> None:
    state = RankState(rank=0)
    state.apply(sample(5, loss=1.0))
    state.apply(sample(3, loss=9.0))  # older than the newest: not charted (as `latest` ignores it)
    state.apply(Record(run="r", rank=0, time=2000.0, step=6, type="heartbeat"))
    state.apply(sample(7, loss=2.0))
    assert columns(state.history.copy())["loss"] == [1.0, 2.0]
    assert len(state.history) == 2 and POINTS >= 200
