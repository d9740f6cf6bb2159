"""lr_scaling: the linear scaling rule and warmup, from start records and sampled LRs."""

from __future__ import annotations

import pytest
from trainhealth.config import ConfigError, detector_settings
from trainhealth.detectors.lr_scaling import LrScalingSettings

from .traces import healthy, run_pipeline, samples, start

SEED_REF = dict(reference_lr=0.02, reference_batch_size=16)  # Detectron: 8 GPUs x 2 images


def lr_alerts(*batches, **settings):
    overrides = {"lr_scaling": settings} if settings else {}
    return [a for a in run_pipeline(*batches, **overrides) if a["alert"] == "lr_scaling"]


def starts(n, **fields):
    return [start(r, time=999.0 + r * 0.01, **fields) for r in range(n)]


def test_eight_gpu_lr_on_one_gpu_fires_at_start_with_the_expected_lr():
    alerts = lr_alerts([start(0, world_size=1, batch_size=2, lr=0.02, warmup_steps=500, **SEED_REF)])
    assert [(a["state"], a["rank"], a["step"], a["severity"]) for a in alerts] == [
        ("firing", None, 0, "critical")]
    a = alerts[0]
    assert a["summary"] == ("LR 0.02 is 8.0x the linear-scaling value 0.0025 for total batch 2 "
                            "(reference LR 0.02 for batch 16); set lr=0.0025 or a total batch of 16")
    assert (a["lr"], a["expected_lr"], a["ratio"], a["total_batch"]) == (0.02, 0.0025, 8.0, 2)
    assert (a["reference_lr"], a["reference_batch_size"], a["reference"]) == (0.02, 16, "reference")
    assert a["problems"] == ["lr_mismatch"] and a["start_rank"] == 0


@pytest.mark.parametrize("gpus, lr", [(1, 0.0025), (2, 0.005), (4, 0.01), (8, 0.02)])
def test_detectron_table_scaled_by_the_rule_stays_quiet(gpus, lr):
    assert lr_alerts(starts(gpus, world_size=gpus, batch_size=2, lr=lr, warmup_steps=500, **SEED_REF)) == []


def test_two_gpu_lr_kept_on_eight_gpus_is_a_warning_that_it_is_too_low():
    # the seed's measurement: LR 0.001 tuned on 2 GPUs, kept on 8 GPUs, lost 5 mAP
    alerts = lr_alerts(starts(8, world_size=8, batch_size=1, lr=0.001, warmup_steps=100,
                              reference_lr=0.001, reference_batch_size=2))
    assert [(a["state"], a["rank"], a["severity"]) for a in alerts] == [("firing", None, "warning")]
    assert alerts[0]["summary"].startswith("LR 0.001 is 4.0x below the linear-scaling value 0.004 "
                                           "for total batch 8 (reference LR 0.001 for batch 2)")


@pytest.mark.parametrize("lr, fires", [(0.0025 * 1.49, False), (0.0025 * 1.5, True),
                                       (0.0025 / 1.49, False), (0.0025 / 1.5, True)])
def test_default_factor_is_one_and_a_half_either_way(lr, fires):
    alerts = lr_alerts([start(0, world_size=1, batch_size=2, lr=lr, warmup_steps=10, **SEED_REF)])
    assert len(alerts) == int(fires)


def test_factor_is_configurable():
    rec = [start(0, world_size=1, batch_size=2, lr=0.005, warmup_steps=10, **SEED_REF)]  # 2x
    assert len(lr_alerts(rec)) == 1
    assert lr_alerts(rec, factor=2.5, critical_factor=4.0) == []


def test_elastic_resize_that_keeps_the_lr_fires_at_the_new_start_and_a_fix_resolves():
    first = starts(8, world_size=8, batch_size=2, lr=0.02, warmup_steps=500)
    shrunk = [start(r, time=2000.0 + r, world_size=4, batch_size=2, lr=0.02, warmup_steps=500)
              for r in range(4)]
    fixed = [start(r, time=3000.0 + r, world_size=4, batch_size=2, lr=0.01, warmup_steps=500)
             for r in range(4)]
    ahead = samples(healthy(50, peak_lr=0.02, warmup=500), step0=1)  # in its warmup, as declared
    alerts = lr_alerts(first, ahead, shrunk, fixed)
    assert [(a["state"], a["rank"], a["step"], a["severity"]) for a in alerts] == [
        ("firing", None, 50, "warning"), ("resolved", None, 50, "warning")]
    assert alerts[0]["summary"] == (
        "LR 0.02 is 2.0x the linear-scaling value 0.01 for total batch 8 (the run's first start: "
        "LR 0.02 for batch 16); set lr=0.01 or a total batch of 16")
    assert alerts[0]["reference"] == "first start"
    assert alerts[1]["summary"].startswith("a new start fixed it")


def test_elastic_resize_that_scales_the_lr_stays_quiet():
    first = starts(8, world_size=8, batch_size=2, lr=0.02, warmup_steps=500)
    grown = [start(r, time=2000.0, world_size=16, batch_size=2, lr=0.04, warmup_steps=500) for r in range(16)]
    assert lr_alerts(first, grown) == []


def test_a_restart_with_other_wrong_numbers_replaces_the_alert():
    alerts = lr_alerts([start(0, world_size=1, batch_size=2, lr=0.02, warmup_steps=9, **SEED_REF)],
                       [start(0, time=2000.0, world_size=2, batch_size=2, lr=0.02, warmup_steps=9,
                              **SEED_REF)])
    assert [(a["state"], a["severity"], a.get("ratio")) for a in alerts] == [
        ("firing", "critical", 8.0), ("resolved", "critical", None), ("firing", "critical", 4.0)]
    assert alerts[1]["summary"].startswith("superseded")


def test_large_total_batch_without_warmup_fires_even_when_the_lr_is_scaled():
    ok_lr = dict(world_size=256, batch_size=16, lr=0.1 * 4096 / 256,
                 reference_lr=0.1, reference_batch_size=256)
    alerts = lr_alerts([start(0, **ok_lr)])
    assert [(a["state"], a["severity"], a["problems"]) for a in alerts] == [
        ("firing", "warning", ["no_warmup"])]
    assert alerts[0]["summary"] == ("total batch 4096 runs at LR 1.6 with no warmup; add a linear "
                                    "warmup (Goyal et al. warm up over 5 epochs) before the peak LR")
    assert lr_alerts([start(0, warmup_steps=2500, **ok_lr)]) == []


def test_lr_scaled_up_eight_times_without_warmup_fires():
    scaled = dict(world_size=8, batch_size=16, lr=0.08, reference_lr=0.01, reference_batch_size=16)
    assert [a["problems"] for a in lr_alerts([start(0, warmup_steps=0, **scaled)])] == [["no_warmup"]]
    assert "an LR 8.0x the reference runs at LR 0.08" in lr_alerts([start(0, **scaled)])[0]["summary"]
    assert lr_alerts([start(0, warmup_steps=100, **scaled)]) == []
    four = dict(scaled, world_size=4, lr=0.04)  # 4x scale-up, total 64: no warmup needed
    assert lr_alerts([start(0, **four)]) == []


@pytest.mark.parametrize("optimizer", ["LARS", "FusedLAMB", "lamb"])
def test_lars_and_lamb_make_the_rule_advisory(optimizer):
    alerts = lr_alerts([start(0, world_size=1, batch_size=2, lr=0.02, optimizer=optimizer, **SEED_REF)])
    assert [(a["severity"], a["optimizer"]) for a in alerts] == [("info", optimizer)]
    assert alerts[0]["summary"].endswith(f"(advisory: {optimizer} adapts per-layer rates)")


def test_sampled_lr_above_the_rule_after_warmup_fires_once():
    # the start claims the right LR, but the schedule actually peaks at 8x
    st = [start(0, world_size=1, batch_size=2, lr=0.0025, warmup_steps=100, **SEED_REF)]
    trace = healthy(400, peak_lr=0.02, warmup=100, lr_drops=(300,))
    alerts = lr_alerts(st, samples(trace))
    assert [(a["state"], a["rank"], a["step"], a["severity"]) for a in alerts] == [
        ("firing", None, 100, "critical")]
    assert alerts[0]["summary"].startswith("LR 0.02 (sampled at step 100) is 8.0x the linear-scaling "
                                           "value 0.0025")


def test_sampled_lr_following_the_rule_with_warmup_and_drops_stays_quiet():
    st = [start(0, world_size=1, batch_size=2, lr=0.0025, warmup_steps=100, **SEED_REF)]
    trace = healthy(400, peak_lr=0.0025, warmup=100, lr_drops=(200, 300))
    assert lr_alerts(st, samples(trace)) == []


def test_resumed_run_below_peak_lr_is_not_judged_from_samples():
    st = [start(0, world_size=1, batch_size=2, lr=0.0025, warmup_steps=100, **SEED_REF)]
    late = samples(healthy(100, peak_lr=0.00025), step0=5000)  # after a 10x drop
    assert lr_alerts(st, late) == []


def test_start_without_batch_or_lr_is_not_judged():
    assert lr_alerts([start(0, lr=0.02, **SEED_REF), start(1, world_size=4, batch_size=2)]) == []


def test_toml_table_maps_onto_settings():
    s = detector_settings({"lr_scaling": {"factor": 2.0, "advisory_optimizers": ["lars"]}})
    assert s["lr_scaling"].factor == 2.0 and s["lr_scaling"].advisory_optimizers == ("lars",)
    with pytest.raises(ConfigError, match="detectors.lr_scaling.tolerance: unknown setting"):
        detector_settings({"lr_scaling": {"tolerance": 2.0}})


@pytest.mark.parametrize("key, value", [
    ("factor", 1.0), ("critical_factor", 1.2), ("large_batch", 0), ("large_scale_up", "8"),
    ("advisory_optimizers", "lars"), ("check_samples", 1),
])
def test_bad_settings_name_the_key_and_value(key, value):
    with pytest.raises(ValueError, match=f"lr_scaling.{key}: .*{value!r}"):
        LrScalingSettings(**{key: value})


@pytest.mark.parametrize("start_lr", [0.0, -0.02, float("nan"), float("inf"), 1e308, 1e-320])
def test_absurd_start_lr_is_not_judged_and_never_crashes_ingest(start_lr):
    # an LR of 0 at start (a warmup from 0 reported as the LR) used to divide by zero and fail the whole batch
    from trainhealth.config import default_detector_settings
    from trainhealth.pipeline import Pipeline

    p = Pipeline(default_detector_settings())
    out = p.process([start(0, world_size=1, batch_size=2, lr=start_lr, warmup_steps=500, **SEED_REF)])
    assert [a for a in out.alerts if a["alert"] == "lr_scaling"] == [] and p.detector_errors == {}


def test_sampled_lr_past_any_float_batch_still_names_the_expected_lr():
    from trainhealth.config import default_detector_settings
    from trainhealth.pipeline import Pipeline

    p = Pipeline(default_detector_settings())
    first = start(0, world_size=1, batch_size=2, lr=0.0025, warmup_steps=5, **SEED_REF)
    out = p.process([first, *samples({"loss": [1.0] * 10, "lr": [0.0025] * 9 + [8e300]}, step0=1)]).alerts
    assert p.detector_errors == {}
    (alert,) = [a for a in out if a["alert"] == "lr_scaling" and "sampled at step" in a["summary"]]
    assert alert["summary"].startswith("LR 8e+300 (sampled at step 10) is 3.2e+303x the linear-scaling value 0.0025 "
                                       "for total batch 2 (reference LR 0.02 for batch 16); set lr=0.0025; also ")
