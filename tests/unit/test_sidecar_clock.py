"""The sidecar's own clock (sidecar_clock.py): its pauses and clock jumps are nobody's silence."""

from __future__ import annotations

import math

import pytest
from trainhealth.config import default_detector_settings
from trainhealth.detectors.liveness import RankStalledSettings
from trainhealth.pipeline import Pipeline
from trainhealth.record import from_obj
from trainhealth.sidecar_clock import BEAT_SECONDS, MAX_GRACE_SECONDS, SidecarClock


class Clocks:
    def __init__(self) -> None:
        self.mono, self.wall = 100.0, 1_000_000.0

    def advance(self, seconds: float, wall_jump: float = 0.0) -> None:
        self.mono += seconds
        self.wall += seconds + wall_jump


def clock() -> tuple[SidecarClock, Clocks]:
    c = Clocks()
    return SidecarClock(lambda: c.wall, lambda: c.mono), c


def test_steady_beats_keep_the_watch_on_wall_time() -> None:
    w, c = clock()
    for _ in range(40):
        c.advance(BEAT_SECONDS)
        assert w.now() == pytest.approx(c.wall)
    assert (w.pauses, w.hold_until) == (0, -math.inf)


def test_a_stop_is_taken_out_of_the_watch_and_verdicts_wait() -> None:
    w, c = clock()
    c.advance(BEAT_SECONDS)
    before = w.now()
    c.advance(12.0)  # SIGSTOP for 12 s
    after = w.now()
    assert after - before == pytest.approx(BEAT_SECONDS)
    assert w.pauses == 1 and w.paused == pytest.approx(12.0 - BEAT_SECONDS)
    assert w.hold_until == pytest.approx(after + MAX_GRACE_SECONDS)


def test_a_short_lag_holds_verdicts_only_briefly() -> None:
    w, c = clock()
    c.advance(2.5)  # one long synchronous handler
    now = w.now()
    assert now + 5.0 < w.hold_until < now + 6.0


@pytest.mark.parametrize("jump", [3600.0, -3600.0])
def test_a_wall_clock_jump_moves_nothing_and_holds_verdicts(jump: float) -> None:
    w, c = clock()
    c.advance(BEAT_SECONDS)
    before = w.now()
    c.advance(BEAT_SECONDS, wall_jump=jump)
    assert w.now() - before == pytest.approx(BEAT_SECONDS)
    assert w.pauses == 1 and w.hold_until > w.now()


def _steps(rank: int, first: int, t0: float, n: int) -> list:
    return [from_obj({"run": "r", "rank": rank, "time": t0 + i * 0.1, "step": first + i, "loss": 1.0})
            for i in range(n)]


@pytest.mark.parametrize("held", [True, False])
def test_pipeline_gives_no_verdict_while_held_and_judges_after(held: bool) -> None:
    s = default_detector_settings()
    s["rank_stalled"] = RankStalledSettings(floor_seconds=2, startup_seconds=2, silence_floor_seconds=3)
    p = Pipeline(s)
    alerts = []
    for step in range(1, 30):
        alerts += p.process(_steps(0, step, 1000.0 + step * 0.1, 1) + _steps(1, step, 1000.0 + step * 0.1, 1),
                            wall=1000.0 + step * 0.1).alerts
    # the sidecar stops at 1003 for 10 s; the ranks go on. When it continues, rank 0's queued records are
    # read first (their times move the run's clock 10 s on), rank 1's half a second later.
    if held:
        p.judge_after = 1013.0 + 5.0
    alerts += p.process(_steps(0, 30, 1003.0, 101), wall=1013.0).alerts
    alerts += p.tick_wall(1013.2)
    alerts += p.process(_steps(1, 30, 1003.0, 101), wall=1013.5).alerts
    for i in range(1, 25):  # both go on
        wall = 1013.5 + i * 0.5
        alerts += p.process(_steps(0, 130 + i, wall, 1) + _steps(1, 130 + i, wall, 1), wall=wall).alerts
        alerts += p.tick_wall(wall + 0.25)
    # one incident per run (rank null); its root ranks are the ones convicted
    convicted = sorted(r for a in alerts if a["alert"] == "rank_stalled" and a["state"] == "firing"
                       for r in a["root_ranks"])
    assert convicted == ([] if held else [1])  # without the hold, rank 1 is convicted of the sidecar's pause
    for i in range(1, 11):  # rank 1 really stops at 1025.5
        wall = 1025.5 + i * 0.5
        alerts += p.process(_steps(0, 160 + i, wall, 1), wall=wall).alerts
        alerts += p.tick_wall(wall + 0.25)
    late = [a for a in alerts if a["alert"] == "rank_stalled" and a["state"] == "firing" and a["time"] > 1025]
    assert [a["root_ranks"] for a in late] == [[1]]


def test_once_every_rank_is_read_again_the_hold_ends_and_a_short_stall_is_reported() -> None:
    s = default_detector_settings()
    s["rank_stalled"] = RankStalledSettings(floor_seconds=2, startup_seconds=2, silence_floor_seconds=3)
    p = Pipeline(s)
    for step in range(1, 30):
        p.process(_steps(0, step, 1000.0 + step * 0.1, 1) + _steps(1, step, 1000.0 + step * 0.1, 1),
                  wall=1000.0 + step * 0.1)
    p.judge_after = 1003.0 + 15.0  # a restart at 1003: verdicts may wait up to 15 s for the retries
    alerts = p.process(_steps(0, 30, 1003.0, 1) + _steps(1, 30, 1003.0, 1), wall=1003.0).alerts
    for i in range(1, 20):  # both are back at once; then rank 1 hangs from 1004 to 1008, inside the 15 s
        wall = 1003.0 + i * 0.5
        batch = _steps(0, 30 + i, wall, 1) + ([] if 1004.0 < wall < 1008.0 else _steps(1, 30 + i, wall, 1))
        alerts += p.process(batch, wall=wall).alerts
        alerts += p.tick_wall(wall + 0.25)
    assert [(a["rank"], a["state"]) for a in alerts if a["alert"] == "rank_stalled"] == [(None, "firing"),
                                                                                        (None, "resolved")]
    assert [a["root_ranks"] for a in alerts if a["alert"] == "rank_stalled" and a["state"] == "firing"] == [[1]]
