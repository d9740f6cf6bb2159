"""The per-rank text writer's own float formatting (exposition.go) writes what prometheus-client's
``floatToGoString`` writes, for every kind of float: it is what keeps /metrics byte for byte the same."""

from __future__ import annotations

import json
import math
import random
import struct
from typing import Any

from prometheus_client.utils import floatToGoString
from trainhealth.config import Settings
from trainhealth.metrics.collector import ExporterSettings, StateCollector, render
from trainhealth.metrics.exposition import go
from trainhealth.metrics.snapshot import Snapshot
from trainhealth.service import Service

EDGES = [0.0, -0.0, 1.0, -1.0, 1e6, -1e6, 999999.9999999999, 1e6 - 1e-10, 1234567.0, 1e7, 1.5e7, 10.0 ** 15,
         9999999999999998.0, 1e16, 1e17, 1e-5, 1.5e-5, 5e-324, -5e-324, 1.7976931348623157e308, -1e20,
         math.inf, -math.inf, math.nan, 0, 1, -3, 10**6, 10**20, True, False, 80_000_000_000, 1_796_534_443.2693543]


def test_go_writes_what_prometheus_client_writes_at_the_edges():
    assert [go(v) for v in EDGES] == [floatToGoString(v) for v in EDGES]
    assert (go(1e6), go(6.1e10), go(1_796_534_443.2693543), go(-0.0)) == ("1e+06", "6.1e+10", "1.7965344432693543e+09",
                                                                         "-0.0")


def test_go_writes_what_prometheus_client_writes_for_random_floats_of_every_size():
    rnd = random.Random(26)
    values = [rnd.choice((1, -1)) * 10 ** rnd.uniform(-30, 30) for _ in range(20_000)]
    values += [float(rnd.randrange(10**17)) for _ in range(20_000)]  # integral values, Go's exponent range
    values += [struct.unpack("<d", rnd.randbytes(8))[0] for _ in range(20_000)]  # any bit pattern: NaNs too
    assert [v for v in values if go(v) != floatToGoString(v)] == []


# -- a scrape after a scrape: rows and lines carried over ----------------------------------------------------

T0 = 1_700_000_000.0


def _service() -> tuple[Any, StateCollector]:
    service = Service(Settings(), clock=lambda: T0)
    return service, StateCollector(service.pipeline, lambda: T0, settings=ExporterSettings(max_series=9))


def _send(service: Any, *records: dict[str, Any]) -> None:
    answer = service.ingest(json.dumps(list(records)).encode(), "application/json")
    assert answer.status == 200 and answer.body["rejected"] == 0, answer.body


def _scrape(collector: StateCollector) -> tuple[Snapshot, bytes]:
    snap = collector.snapshot()
    text = render(snap, collector.lines)
    assert text == render(snap)  # the carried-over lines are what a fresh render writes
    return snap, text


def test_a_zero_that_changes_sign_between_scrapes_is_written_with_its_sign_each_time():
    service, collector = _service()
    for step, loss in enumerate([0.0, -0.0, -0.0, 0.0, 2.0, -0.0], start=1):
        _send(service, {"run": "job", "rank": 0, "time": T0 + step, "step": step, "loss": loss, "lr": 0.0})
        _, text = _scrape(collector)
        assert f'trainhealth_loss{{rank="0",run="job"}} {loss!r}\n'.encode() in text
        assert b'trainhealth_learning_rate{rank="0",run="job"} 0.0\n' in text


def test_an_unchanged_rank_keeps_its_row_and_a_new_nan_step_counts_against_the_series_cap():
    service, collector = _service()
    # a rank here: 3 state series + loss + lr = 5 of the cap of 9; two runs of one rank do not both fit
    _send(service, {"run": "a", "rank": 0, "time": T0, "step": 1, "loss": 1.0, "lr": 0.1})
    _send(service, {"run": "b", "rank": 0, "time": T0 - 1, "step": 1, "loss": 1.0})  # 4 series: fits beside a
    first, _ = _scrape(collector)
    again, _ = _scrape(collector)
    assert [r for _, rows in again.runs for r in rows] == [r for _, rows in first.runs for r in rows]
    assert all(a is b for (_, x), (_, y) in zip(first.runs, again.runs) for a, b in zip(x, y))  # not copied again
    _send(service, {"run": "b", "rank": 0, "time": T0 - 1, "step": 2, "loss": float("nan")})  # +1: the NaN step
    snap, text = _scrape(collector)
    assert [run for run, _ in snap.runs] == ["a"] and snap.omitted["series_cap"] == 1
    assert b'trainhealth_step{rank="0",run="b"}' not in text  # (its alert is still counted as firing)
