"""loss_spike and grad_explosion over generated traces: spikes fire and resolve, look-alikes stay quiet."""

from __future__ import annotations

import math
import random

import pytest
from trainhealth.config import default_detector_settings
from trainhealth.detectors.spikes import GradExplosionSettings, LazyWindow, RobustWindow, SpikeSettings
from trainhealth.pipeline import Pipeline

from .traces import healthy, merge, only, run_pipeline, samples, scale_from, start, with_amp

SPIKES = ("loss_spike", "grad_explosion")


def running_mean(trace, alpha=0.1):
    """The loss as many trainers log it: an exponential running mean of the batch losses."""
    out, mean = [], trace["loss"][0]
    for x in trace["loss"]:
        mean = (1 - alpha) * mean + alpha * x
        out.append(mean)
    return {**trace, "loss": out}


def spike_alerts(*batches, **overrides):
    return [a for a in run_pipeline(*batches, **overrides) if a["alert"] in SPIKES]


@pytest.mark.parametrize("kind, trace", [
    ("gaussian noise", healthy(3000, seed=1)),
    ("student-t df=3 noise", healthy(3000, seed=2, df=3, loss_noise=0.1, grad_noise=0.3)),
    ("student-t df=2 noise", healthy(3000, seed=3, df=2, loss_noise=0.1, grad_noise=0.3)),
    ("small batch: noise 0.6 in log space", healthy(3000, seed=4, loss_noise=0.6, grad_noise=0.6)),
    ("warmup from a high loss", healthy(3000, seed=5, loss0=7.0, tau=50, warmup=300, df=3)),
    ("10x LR drops with loss drops", healthy(3000, seed=6, lr_drops=(1000, 2000), loss_drop=0.3)),
    ("grad norm rising 30x over 400 steps", {**healthy(3000, seed=7),
     "grad_norm": [0.1 * math.exp(min(i, 400) * math.log(30) / 400) for i in range(3000)]}),
    ("noise-free full-batch curve", healthy(3000, seed=8, loss_noise=0.0, grad_noise=0.0)),
    ("fp16 overflow steps", with_amp(healthy(3000, seed=9), [0, 1, 2, 3, 700, 1400, 2100])),
    ("loss logged as a running mean of noisy batches", running_mean(healthy(3000, seed=10, loss_noise=0.5))),
])
def test_healthy_look_alikes_stay_quiet(kind, trace):
    records = merge(*(samples(trace, rank=r) for r in range(2)))
    assert spike_alerts(records) == [], kind


def test_loss_spike_that_recovers_fires_then_resolves():
    quiet = healthy(600, seed=0)
    spiky = scale_from(healthy(600, seed=1), "loss", 399, [5, 6, 5, 4])  # steps 400-403
    alerts = spike_alerts(merge(samples(quiet, rank=0), samples(spiky, rank=1)))
    assert only(alerts, "loss_spike") == [("firing", None, 401), ("resolved", None, 406)]
    fired, gone = alerts
    assert fired["severity"] == "warning" and fired["onset_step"] == 400
    assert (fired["first_rank"], fired["spiking_ranks"], fired["judged"]) == (1, [1], "robust")
    assert fired["ratio"] == pytest.approx(fired["value"] / fired["baseline"])
    assert 4.0 < fired["ratio"] < 8.0 and fired["z"] >= 10
    assert fired["summary"].startswith(f"loss jumped to {fired['value']:.4g} at step 401 on rank 1, ")
    assert "lower the LR or clip gradients" in fired["summary"]
    assert gone["summary"].startswith("loss back to ") and gone["resolved_by"] == "recovered"


def test_single_bad_batch_is_not_a_spike():
    trace = scale_from(healthy(600, seed=0), "loss", 399, [20])
    assert spike_alerts(samples(trace)) == []


def test_one_confirm_sample_setting_fires_on_a_single_bad_batch():
    trace = scale_from(healthy(600, seed=0), "loss", 399, [20])
    alerts = spike_alerts(samples(trace), loss_spike={"confirm_samples": 1})
    assert only(alerts, "loss_spike") == [("firing", None, 400), ("resolved", None, 403)]


def test_no_judgement_before_min_history():
    trace = scale_from(healthy(600, seed=0), "loss", 9, [10] * 5)  # steps 10-14
    assert spike_alerts(samples(trace)) == []


def test_spike_right_after_min_history_fires():
    trace = scale_from(healthy(600, seed=0), "loss", 20, [10] * 5)  # 20 values seen before step 21
    assert only(spike_alerts(samples(trace)), "loss_spike") == [("firing", None, 22), ("resolved", None, 28)]


def test_grad_explosion_on_one_rank_names_that_rank():
    blown = scale_from(healthy(600, seed=1), "grad_norm", 299, [20] * 30)  # steps 300-329
    alerts = spike_alerts(merge(samples(healthy(600, seed=0), rank=0), samples(blown, rank=1)))
    assert only(alerts, "grad_explosion") == [("firing", None, 301), ("resolved", None, 332)]
    assert "clip gradients" in alerts[0]["summary"] and alerts[0]["ratio"] > 10


def test_grad_norm_bump_below_min_ratio_is_quiet():
    trace = scale_from(healthy(600, seed=1, grad_noise=0.02), "grad_norm", 299, [4] * 30)
    assert spike_alerts(samples(trace)) == []


def test_level_shift_that_stays_resolves_as_a_new_level_after_a_window():
    trace = scale_from(healthy(800, seed=0), "loss", 299, [8] * 500)  # steps 300 onwards
    alerts = spike_alerts(samples(trace))
    assert only(alerts, "loss_spike") == [("firing", None, 301), ("resolved", None, 401)]
    assert "settled at a new level" in alerts[1]["summary"]


def test_restart_resolves_an_open_spike_and_clears_history():
    trace = scale_from(healthy(300, seed=0), "loss", 199, [10] * 100)  # high until the end
    after = samples(healthy(30, seed=5), step0=150, t0=3000.0)  # 30 samples: history is too short
    alerts = spike_alerts(samples(trace), [start(0, time=2000.0)], after)
    assert only(alerts, "loss_spike") == [("firing", None, 201), ("resolved", None, 300)]
    assert "restarted" in alerts[1]["summary"]


def test_negative_losses_switch_to_linear_values():
    base = healthy(600, seed=0, loss_noise=0.02)
    shifted = {**base, "loss": [x - 5.0 for x in base["loss"]]}  # around -4.6: an ELBO-like loss
    assert spike_alerts(samples(shifted)) == []
    spiked = {**shifted, "loss": [x + (20.0 if 400 <= i < 405 else 0.0)
                                  for i, x in enumerate(shifted["loss"])]}
    assert only(spike_alerts(samples(spiked)), "loss_spike") == [("firing", None, 402), ("resolved", None, 408)]


def test_nan_loss_is_left_to_nan_divergence():
    trace = healthy(300, seed=0)
    trace["loss"][200:] = [math.nan] * 100
    alerts = run_pipeline(samples(trace))
    assert [a["alert"] for a in alerts] == ["nan_divergence"]


def test_config_reload_resizes_the_window_keeping_history():
    p = Pipeline(default_detector_settings())
    trace = scale_from(healthy(600, seed=0), "loss", 399, [6] * 4)
    recs = samples(trace)
    p.process(recs[:300])
    settings = default_detector_settings()
    settings["loss_spike"] = SpikeSettings(window=50, min_history=20)
    p.reconfigure(settings)
    out = p.process(recs[300:]).alerts
    assert [(a["alert"], a["state"], a["step"]) for a in out] == [
        ("loss_spike", "firing", 401), ("loss_spike", "resolved", 406)]


def test_robust_window_keeps_the_median_of_the_last_values():
    w = RobustWindow(5)
    for x in [5.0, 1.0, 4.0, 2.0, 3.0, 100.0, 0.0]:
        w.push(x)
    assert list(w.values) == [4.0, 2.0, 3.0, 100.0, 0.0]
    assert w.ordered == [0.0, 2.0, 3.0, 4.0, 100.0]
    assert w.median() == 3.0
    w.push(7.0)
    w.push(8.0)
    assert w.median() == 7.0 and len(w) == 5


def test_lazy_window_gives_the_same_medians_as_the_eager_one():
    rng = random.Random(7)
    eager, lazy = RobustWindow(9), LazyWindow(9)
    for i in range(3000):
        x = float(rng.randrange(20))  # ties: deleting a dropped value must find an equal one
        if i % 997 == 0:
            eager.clear()
            lazy.clear()
        if i == 1500:
            eager.resize(4)
            lazy.resize(4)
        eager.push(x)
        lazy.push(x)
        if rng.random() < (0.9 if i < 1000 else 0.03):  # read after almost every push, then rarely
            assert lazy.median() == eager.median(), i
    assert list(lazy.values) == list(eager.values)
    lazy.median()
    assert lazy.ordered == eager.ordered


def test_lazy_window_never_read_stays_bounded():
    w = LazyWindow(10)
    for i in range(1000):
        w.push(float(i))
    assert len(w.added) <= 10 and len(w.dropped) <= 10
    assert w.median() == 994.5


def test_steady_exponential_blowup_warns_long_before_the_nan():
    # a diverging run: healthy for 300 steps, then the loss grows 1.5x per step until it
    # overflows float32 (inf, then NaN); the window's spread grows with such a trend, its
    # step-to-step noise does not
    grow = [1.5 ** k for k in range(1, 300)]
    trace = scale_from(healthy(600, seed=0), "loss", 300, grow)
    trace = scale_from(trace, "grad_norm", 300, [g ** 0.5 for g in grow])
    first_inf = next(i for i, x in enumerate(trace["loss"]) if x > 3.4e38)
    trace["loss"][first_inf:] = [math.inf] + [math.nan] * (599 - first_inf)
    trace["grad_norm"][first_inf:] = [math.nan] * (600 - first_inf)
    alerts = run_pipeline(samples(trace))
    # one incident before the NaN (the grad norm's explosion joins the loss spike's alert, not a second
    # page), folded into the NaN's alert, whose timeline holds the rise
    assert [(a["alert"], a["state"], a["step"]) for a in alerts] == [
        ("loss_spike", "firing", 304), ("loss_spike", "resolved", 521), ("nan_divergence", "firing", 521)]
    assert alerts[1]["resolved_by"] == "diverged"
    assert alerts[-1]["summary"].startswith("loss became inf at step 521 on rank 0 (its own loss) (before it: "
                                            "loss and grad norm rose from step 303 (rank 0))")
    assert alerts[-1]["timeline"] == ["loss and grad norm rose from step 303 (rank 0)"]


@pytest.mark.parametrize("cls, key, value", [
    (SpikeSettings, "window", 0), (SpikeSettings, "z_threshold", -1.0),
    (SpikeSettings, "min_ratio", 1.0), (GradExplosionSettings, "min_history", 2),
    (GradExplosionSettings, "confirm_samples", 1.5), (SpikeSettings, "z_resolve", 20.0),
])
def test_bad_settings_name_the_key_and_value(cls, key, value):
    name = "grad_explosion" if cls is GradExplosionSettings else "loss_spike"
    with pytest.raises(ValueError, match=f"{name}.{key}: .*{value!r}"):
        cls(**{key: value})
