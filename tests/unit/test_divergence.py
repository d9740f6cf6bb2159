"""nan_divergence over generated traces: exact step and rank, first rank, AMP overflows."""

from __future__ import annotations

import math

import pytest
from trainhealth.config import default_detector_settings
from trainhealth.detectors.nan_divergence import NanDivergenceSettings
from trainhealth.pipeline import Pipeline
from trainhealth.status import run_view

from .traces import healthy, merge, run_pipeline, samples, set_at, start, with_amp

NAN, INF = math.nan, math.inf


def live_alerts(*batches):
    """The open nan_divergence alerts after these batches, as they stand now (refreshed in place)."""
    p = Pipeline(default_detector_settings())
    for batch in batches:
        p.process(list(batch))
    return [a for a in p.book.open.values() if a["alert"] == "nan_divergence"]


def nan_alerts(*batches, **settings):
    overrides = {"nan_divergence": settings} if settings else {}
    alerts = run_pipeline(*batches, **overrides)
    return [a for a in alerts if a["alert"] == "nan_divergence"]


def test_nan_loss_fires_at_the_exact_step_on_that_rank():
    ranks = [healthy(300, seed=r) for r in range(4)]
    ranks[2] = set_at(ranks[2], "loss", {199: NAN})  # step 200
    alerts = nan_alerts(merge(*(samples(t, rank=r) for r, t in enumerate(ranks))))
    assert [(a["state"], a["rank"], a["step"]) for a in alerts] == [("firing", None, 200)]
    a = alerts[0]
    assert a["severity"] == "critical" and a["fingerprint"] == "trace/-/nan_divergence"
    assert a["cause"] == "nonfinite_loss" and math.isnan(a["loss"])
    assert (a["first_rank"], a["first_step"], a["diverged_ranks"]) == (2, 200, 1)
    assert a["summary"].startswith("loss became nan at step 200 on rank 2 (its own loss); restart from "
                                   "the last good checkpoint with a lower LR")


def test_infinite_grad_norm_without_amp_fires():
    trace = set_at(healthy(100), "grad_norm", {49: INF})
    alerts = nan_alerts(samples(trace, rank=1))
    assert [(a["first_rank"], a["step"], a["cause"]) for a in alerts] == [(1, 50, "nonfinite_grad_norm")]
    assert alerts[0]["summary"] == (
        "grad_norm became inf at step 50 on rank 1; the loss was still finite: the gradients overflowed; "
        "restart from the last good checkpoint with a lower LR or clip gradients")


def test_several_ranks_name_the_rank_that_went_first():
    # bad data on rank 3 at step 100; the all-reduce spreads it to every rank at step 101
    traces = [set_at(healthy(150, seed=r), "loss", {100: NAN}) for r in range(4)]
    traces[3] = set_at(traces[3], "loss", {99: NAN})
    alerts = run_pipeline(merge(*(samples(t, rank=r) for r, t in enumerate(traces))))
    assert [(a["alert"], a["rank"], a["step"], a["first_rank"]) for a in alerts] == [
        ("nan_divergence", None, 100, 3)]  # one page for the run, not four
    (a,) = live_alerts(merge(*(samples(t, rank=r) for r, t in enumerate(traces))))
    assert (a["first_rank"], a["first_step"], a["diverged_ranks"], a["root_ranks"]) == (3, 100, 4, [3])
    # these traces' grad norms differ per rank: no sign of shared gradients, so each loss is its own
    assert a["shared_gradients"] is False and a["own_loss_ranks"] == [0, 1, 2, 3]
    assert a["summary"].endswith("; the own loss of ranks 0-2 became non-finite too (step 101): the same "
                                 "advice holds")


def test_first_rank_is_corrected_when_an_earlier_step_arrives_in_a_later_batch():
    p = Pipeline(default_detector_settings())
    nan0 = set_at(healthy(120, seed=0), "loss", {100: NAN})
    nan3 = set_at(healthy(120, seed=3), "loss", {99: NAN})
    first = [dict(a) for a in p.process(samples(nan0, rank=0)[:105]).alerts]  # rank 0's batch came first
    later = p.process(samples(nan3, rank=3)[:105]).alerts
    assert [(a["rank"], a["step"], a["first_rank"]) for a in first] == [(None, 101, 0)]
    assert later == []  # no second page: the open alert is corrected in place
    (now,) = p.book.open.values()
    assert (now["first_rank"], now["first_step"], now["fingerprint"]) == (3, 100, "trace/-/nan_divergence")
    assert now["summary"].startswith("loss became nan at step 100 on rank 3 (its own loss)")


def nan_data(rank_with_bad_batch, ranks=2, step=8, steps=12):
    """The trainer's nan-data fault: that rank's loss is NaN at ``step``; the all-reduce makes every
    rank's grad norm NaN in the same step, and every loss NaN from the next step on."""
    out = []
    for r in range(ranks):
        trace = set_at(healthy(steps, seed=r), "grad_norm", {step - 1: NAN})
        trace = set_at(trace, "loss", {i: NAN for i in range(step, steps)})
        if r == rank_with_bad_batch:
            trace = set_at(trace, "loss", {step - 1: NAN})
        out.append(samples(trace, rank=r))  # rank 0's records carry the earliest times
    return out


def test_nan_loss_beats_an_all_reduced_nan_grad_norm_at_the_same_step_in_one_batch():
    r0, r1 = nan_data(rank_with_bad_batch=1)
    alerts = nan_alerts(merge(r0, r1))  # rank 0's step-8 sample comes first (earlier time)
    # the alert goes out after the batch: it already names the rank whose own loss went NaN
    assert [(a["rank"], a["step"], a["cause"]) for a in alerts] == [(None, 8, "nonfinite_loss")]
    (now,) = live_alerts(merge(r0, r1))
    assert (now["first_rank"], now["first_step"], now["cause"]) == (1, 8, "nonfinite_loss")
    assert now["summary"] == ("loss became nan at step 8 on rank 1 (its own loss); restart from the last "
                              "good checkpoint with a lower LR, and check its batch at "
                              "that step; rank 0 got the NaN only through the shared gradients: check rank "
                              "1's batch, not theirs")
    assert (now["root_ranks"], now["received_ranks"]) == ([1], [0])


def test_first_rank_is_corrected_when_the_nan_loss_rank_arrives_after_another_ranks_alert():
    r0, r1, r2 = nan_data(rank_with_bad_batch=1, ranks=3)
    p = Pipeline(default_detector_settings())
    got = [[dict(a) for a in p.process(batch).alerts] for batch in (r0, r1, r2)]  # each rank's batch
    # one page, with the only guess there was (rank 0); the open alert then names rank 1 in place
    assert [(a["rank"], a["first_rank"]) for out in got for a in out] == [(None, 0)]
    (now,) = p.book.open.values()
    assert now["first_rank"] == 1 and "check rank 1's batch" in now["summary"]
    assert p.findings("trace")["nan_divergence"] == {
        "first_rank": 1, "first_step": 8, "first_time": 1004.001, "first_cause": "nonfinite_loss",
        "diverged_ranks": [0, 1, 2], "root_ranks": [1], "own_loss_ranks": [1], "received_ranks": [0, 2]}
    assert run_view(p.runs["trace"], p.book, findings=p.findings("trace"))["findings"]["nan_divergence"][
        "first_rank"] == 1


def test_a_lower_step_wins_over_a_nan_loss():
    grad7 = samples(set_at(healthy(12, seed=0), "grad_norm", {6: INF}), rank=0)
    loss8 = samples(set_at(healthy(12, seed=1), "loss", {7: NAN}), rank=1)
    alerts = nan_alerts(loss8, grad7)
    assert [(a["rank"], a["step"], a["first_rank"], a["first_step"]) for a in alerts] == [(None, 8, 1, 8)]
    (now,) = live_alerts(loss8, grad7)
    assert (now["first_rank"], now["first_step"], now["cause"]) == (0, 7, "nonfinite_grad_norm")


def test_no_findings_before_any_divergence():
    p = Pipeline(default_detector_settings())
    p.process(samples(healthy(20)))
    assert p.findings("trace") == {}
    assert "findings" not in run_view(p.runs["trace"], p.book)


def test_late_initial_start_of_another_rank_does_not_resolve_the_divergence():
    nan0 = set_at(healthy(40, seed=0), "loss", {i: NAN for i in range(9, 40)})
    before = [start(0, time=1000.0)] + samples(nan0, rank=0)[:15]
    late = [start(1, time=1008.0)] + samples(healthy(20, seed=1), rank=1)  # rank 1 was slow to start
    alerts = nan_alerts(before, late)
    assert [(a["state"], a["first_rank"], a["step"]) for a in alerts] == [("firing", 0, 10)]


def test_a_ranks_own_start_after_its_samples_is_a_restart_and_the_other_ranks_restarts_resolve_nothing():
    nan0 = set_at(healthy(40, seed=0), "loss", {i: NAN for i in range(9, 40)})
    first = [start(0, time=999.0), start(1, time=999.0)] + merge(
        samples(nan0, rank=0)[:20], samples(healthy(20, seed=1), rank=1))
    restart0 = [start(0, time=1100.0)]
    again = samples(set_at(healthy(10, seed=2), "loss", {4: INF}), rank=0, t0=1100.0)  # step 5
    restart1 = [start(1, time=1104.0)]  # rank 1's restart start arrives after rank 0 diverged again
    alerts = nan_alerts(first, restart0, again, restart1)
    assert [(a["state"], a["rank"], a["step"]) for a in alerts] == [
        ("firing", None, 10), ("resolved", None, 20), ("firing", None, 5)]
    assert alerts[1]["summary"] == "run restarted (start from rank 0) after divergence first on rank 0"


def test_divergence_is_terminal_until_a_start_record():
    trace = set_at(healthy(200), "loss", {49: NAN, 50: NAN, 51: 2.0, 52: NAN})
    before = samples(trace)[:100]
    again = samples(set_at(healthy(100), "loss", {9: INF}), step0=41, t0=2000.0)
    restart = [start(0, time=1100.0, world_size=1, batch_size=8, lr=0.1)]
    alerts = nan_alerts(before, restart, again)
    assert [(a["state"], a["rank"], a["step"]) for a in alerts] == [
        ("firing", None, 50), ("resolved", None, 100), ("firing", None, 50)]
    assert "run restarted" in alerts[1]["summary"]


def test_one_start_resolves_every_diverged_rank():
    traces = [set_at(healthy(60, seed=r), "loss", {30: NAN}) for r in range(3)]
    records = merge(*(samples(t, rank=r) for r, t in enumerate(traces)))
    alerts = nan_alerts(records, [start(0, time=2000.0)])
    assert [(a["state"], a["rank"], a["first_rank"] if a["state"] == "firing" else None) for a in alerts] == [
        ("firing", None, 0), ("resolved", None, None)]
    # the three ranks went NaN at the same step on their own: ties go to the lowest rank, all are roots
    assert "at step 31 on ranks 0-2 (each on its own)" in alerts[0]["summary"]


@pytest.mark.parametrize("logged", ["after", "before"])
def test_amp_overflow_steps_stay_quiet(logged):
    # startup calibration (6 skipped steps from 2^16), then the scaler tries to grow every
    # 500 clean steps and overflows right away, as in a healthy fp16 run
    overflows = [0, 1, 2, 3, 4, 5] + [506 + 501 * k for k in range(9)]
    trace = with_amp(healthy(5000, seed=1), overflows, growth_interval=500, logged=logged)
    records = merge(*(samples(trace, rank=r) for r in range(2)))
    assert nan_alerts(records) == []
    # every overflow carried an infinite grad norm: the test trace really has them
    assert sum(math.isinf(g) for g in trace["grad_norm"]) == len(overflows)


def test_amp_nan_loss_is_divergence():
    trace = set_at(with_amp(healthy(300), [0, 1, 2]), "loss", {149: NAN})
    assert [(a["step"], a["cause"]) for a in nan_alerts(samples(trace))] == [(150, "nonfinite_loss")]


@pytest.mark.parametrize("logged, step", [("after", 110), ("before", 111)])
def test_amp_overflows_that_keep_coming_are_divergence(logged, step):
    trace = with_amp(healthy(300), [0, 1, 2] + list(range(100, 140)), logged=logged)
    alerts = nan_alerts(samples(trace))
    assert [(a["first_rank"], a["step"], a["cause"]) for a in alerts] == [(0, step, "amp_scale_collapse")]
    a = alerts[0]
    assert a["overflows"] == 10 and a["grad_scale"] == 2.0 ** 16 / 2 ** 13
    assert "after 10 overflow-skipped steps in a row" in a["summary"]


def test_amp_scale_below_one_is_divergence():
    # scale 64 at start, overflows every other step: never 10 in a row, but it falls below 1
    overflows = [100 + 2 * k for k in range(7)]
    trace = with_amp(healthy(300), overflows, init_scale=64.0)
    alerts = nan_alerts(samples(trace))
    assert [(a["step"], a["grad_scale"]) for a in alerts] == [(113, 0.5)]
    assert "below 1, so gradients overflow fp16 even unscaled" in alerts[0]["summary"]


def test_amp_scale_collapse_from_its_recent_peak_is_divergence():
    # every third step overflows: the scale falls 2^10 below the 2^16 at which steps succeeded
    overflows = [200 + 3 * k for k in range(10)]
    trace = with_amp(healthy(400), overflows)
    alerts = nan_alerts(samples(trace))
    assert [(a["step"], a["peak_scale"], a["grad_scale"]) for a in alerts] == [(228, 65536.0, 64.0)]
    assert "1024x below its recent peak 65536" in alerts[0]["summary"]


def test_amp_scale_dropping_to_zero_with_no_floor_is_a_collapse_not_a_crash():
    # amp_min_scale = 0 is valid; a scale of exactly 0 must not divide by zero in the summary
    trace = set_at(healthy(100), "grad_scale", {k: 65536.0 for k in range(60)} | {60: 0.0})
    alerts = nan_alerts(samples(trace), amp_min_scale=0.0)
    assert [(a["step"], a["peak_scale"], a["grad_scale"]) for a in alerts] == [(61, 65536.0, 0.0)]
    assert "collapsed to 0 (infx below its recent peak 65536)" in alerts[0]["summary"]


def test_amp_infinite_grad_without_a_scale_drop_fires_at_its_own_step():
    trace = with_amp(healthy(100), [])
    trace = set_at(trace, "grad_norm", {59: INF})  # step 60: the scale does not drop after it
    alerts = nan_alerts(samples(trace))
    assert [(a["step"], a["cause"], a["time"]) for a in alerts] == [(60, "nonfinite_grad_norm", 1030.0)]


def test_amp_skipped_nan_grad_on_one_rank_stays_quiet_while_other_rank_nan_loss_fires():
    quiet = with_amp(healthy(200, seed=0), [0, 1, 120])
    loud = set_at(with_amp(healthy(200, seed=1), [0, 1]), "loss", {150: NAN})
    alerts = nan_alerts(merge(samples(quiet, rank=0), samples(loud, rank=1)))
    assert [(a["first_rank"], a["step"]) for a in alerts] == [(1, 151)]


def test_disabled_detector_is_silent():
    trace = set_at(healthy(50), "loss", {20: NAN})
    assert nan_alerts(samples(trace), enabled=False) == []


@pytest.mark.parametrize("key, value", [
    ("amp_max_consecutive_overflows", 0), ("amp_min_scale", -1.0), ("amp_collapse_factor", 1.0),
    ("amp_peak_window", 2.5), ("enabled", "yes"),
])
def test_bad_settings_name_the_key_and_value(key, value):
    with pytest.raises(ValueError, match=f"nan_divergence.{key}: .*{value!r}"):
        NanDivergenceSettings(**{key: value})


def test_a_nan_received_through_the_all_reduce_before_its_root_is_heard_is_not_called_an_overflow():
    """DDP: rank 1's own loss turns NaN at step 50 and the all-reduce spreads NaN gradients to rank 0 in the same
    step. Rank 0's record arrives first: the page must not tell on-call "the gradients overflowed" (the wrong fix)
    while rank 1, which may be the root, is unheard; rank 1's record refreshes it in place to the root's picture."""
    from trainhealth.pipeline import Pipeline

    from .traces import RUN

    base = healthy(100, seed=3)  # shared gradients: both ranks report the same global grad norm
    rank0 = set_at(base, "grad_norm", {49: NAN})
    rank1 = set_at(set_at(base, "grad_norm", {49: NAN}), "loss", {49: NAN})
    first, second = samples(rank0, rank=0), samples(rank1, rank=1)
    pipeline = Pipeline(default_detector_settings())
    pipeline.process(merge(first[:49], second[:49]))  # both healthy through step 49
    fired = [dict(a) for a in pipeline.process([first[49]]).alerts if a["alert"] == "nan_divergence"]
    assert [(a["state"], a["first_rank"], a["cause"]) for a in fired] == [("firing", 0, "nonfinite_grad_norm")]
    assert "the loss was still finite: the gradients overflowed" not in fired[0]["summary"]
    assert ("its own loss was still finite: the NaN came through the all-reduce from a rank whose record has not "
            "arrived yet (rank 1: this alert is updated when it does), or the gradients overflowed"
            ) in fired[0]["summary"]
    pipeline.process([second[49]])
    now = [a for a in pipeline.book.firing(RUN) if a["alert"] == "nan_divergence"]
    assert [(a["first_rank"], a["root_ranks"], a["received_ranks"]) for a in now] == [(1, [1], [0])]
    assert now[0]["summary"].startswith("loss became nan at step 50 on rank 1 (its own loss); restart from")


def test_every_rank_heard_with_a_finite_loss_and_a_nan_grad_norm_is_an_overflow():
    base = healthy(100, seed=3)
    ranks = [samples(set_at(base, "grad_norm", {49: NAN}), rank=r) for r in (0, 1)]
    alerts = nan_alerts(merge(*ranks))
    assert [(a["state"], a["first_rank"]) for a in alerts] == [("firing", 0)]
    assert "the loss was still finite: the gradients overflowed; restart" in alerts[0]["summary"]
