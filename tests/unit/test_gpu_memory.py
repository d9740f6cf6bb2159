"""gpu_oom_risk and gpu_oom over generated traces (seeded): failures and healthy look-alikes."""

from __future__ import annotations

import pytest
from trainhealth.config import default_detector_settings, detector_settings
from trainhealth.detectors import ALL
from trainhealth.detectors.gpu_memory import GpuOom, GpuOomRisk, GpuOomRiskSettings, GpuOomSettings
from trainhealth.pipeline import Pipeline
from trainhealth.record import from_obj

from tests.memory_traces import T0, GiB, MiB, const, gpu_trace, linear, noise, total, warmup

T = 80 * GiB
PER_HOUR = 3600  # shapes take the step as their t: linear(x * PER_HOUR) adds x per step


def alerts(records, settings=None):
    p = Pipeline(settings or default_detector_settings(), detectors=[GpuOomRisk, GpuOom])
    out = []
    for rec in records:
        out += p.process([rec]).alerts
    return out


def healthy(level=0.5, seed_noise=0.002):
    """Allocator warmup over the first ~100 steps, then flat at ``level`` + 0.2 with jitter."""
    return total(const(level * T), warmup(0.2 * T, 25), noise(seed_noise * T))


def leak(mib_per_step, **kw):
    return linear(mib_per_step * MiB * PER_HOUR, **kw)


def test_leaking_rank_fires_with_forecast_and_rate():
    recs = gpu_trace({0: healthy(), 1: total(healthy(), leak(8)), 2: healthy(), 3: healthy()}, 3000, seed=1)
    out = alerts(recs)
    assert [(a["alert"], a["rank"], a["state"]) for a in out] == [("gpu_oom_risk", 1, "firing")]
    a = out[0]
    assert 250 <= a["step"] <= 400  # 12 buckets after warmup_steps
    assert a["rate_mib_per_step"] == pytest.approx(8, rel=0.2)
    headroom = a["total_bytes"] - a["peak_bytes"]
    assert a["steps_to_oom"] == pytest.approx(headroom / (a["rate_mib_per_step"] * MiB), rel=0.01)
    assert a["seconds_to_oom"] == pytest.approx(a["steps_to_oom"] * 0.5, rel=0.05)
    assert a["steps_to_oom"] <= 1000 or a["seconds_to_oom"] <= 1800
    assert "MiB/step" in a["summary"] and "rank 1" in a["summary"] and "steps" in a["summary"]


def test_near_capacity_slow_rise_fires_before_the_forecast_horizon():
    shape = total(const(0.9 * T), warmup(0.05 * T, 25), leak(0.5, start=500), noise(0.001 * T))
    out = alerts(gpu_trace({0: shape}, 6000, seed=2))
    assert [(a["rank"], a["state"]) for a in out] == [(0, "firing")]
    a = out[0]
    assert 600 <= a["step"] <= 1500
    assert a["fraction"] >= 0.95
    # fired for being near, not for the forecast
    assert a["steps_to_oom"] > 1000 and a["seconds_to_oom"] > 1800


def test_gpu_steadily_filled_to_93_percent_stays_quiet():
    shape = lambda: total(const(0.9 * T), warmup(0.03 * T, 25), noise(0.003 * T))  # noqa: E731
    assert alerts(gpu_trace({k: shape() for k in range(4)}, 6000, seed=3)) == []


def test_variable_length_batches_peaking_up_to_93_percent_stay_quiet():
    recs = gpu_trace({k: (lambda t, r: r.uniform(0.7, 0.93) * T) for k in range(2)}, 6000, seed=4)
    assert alerts(recs) == []


@pytest.mark.parametrize("tau", [10, 25, 40])
def test_warmup_growth_that_flattens_at_90_percent_stays_quiet(tau):
    shape = total(const(0.4 * T), warmup(0.5 * T, tau), noise(0.002 * T))
    assert alerts(gpu_trace({0: shape, 1: shape}, 3000, seed=5)) == []


def test_slow_leak_that_would_take_hours_stays_quiet():
    # 1 MiB/step from 70%: 24 GiB of headroom lasts 24k steps (3.4 h at 0.5 s/step): beyond both horizons
    assert alerts(gpu_trace({0: total(healthy(), leak(1))}, 4000, seed=6)) == []


def test_fast_steps_fire_on_the_seconds_horizon():
    # 1 MiB/step at 0.05 s/step: ~22k steps (> horizon_steps) but ~19 min (< horizon_seconds)
    out = alerts(gpu_trace({0: total(healthy(), leak(1))}, 20000, seconds_per_step=0.05, seed=7))
    assert [(a["rank"], a["state"]) for a in out] == [(0, "firing")]
    assert out[0]["steps_to_oom"] > 1000 and out[0]["seconds_to_oom"] <= 1800
    assert 1000 <= out[0]["step"] <= 3000


def test_alert_resolves_when_the_growth_stops():
    out = alerts(gpu_trace({0: total(healthy(), leak(8, stop=1500))}, 3000, seed=8))
    assert [(a["state"]) for a in out] == ["firing", "resolved"]
    assert out[0]["step"] <= 400
    assert 1500 < out[1]["step"] <= 2200  # once the last third of the window makes no new high


def test_reserved_memory_is_used_when_the_peak_is_not_sent():
    recs = gpu_trace({0: total(healthy(), leak(8))}, 1000, field="gpu_mem_reserved_bytes", seed=9)
    out = alerts(recs)
    assert [(a["rank"], a["state"]) for a in out] == [(0, "firing")]


def test_samples_without_device_total_are_not_judged():
    recs = [from_obj({"run": "r", "rank": 0, "time": T0 + i, "step": i,
                      "gpu_mem_peak_bytes": 1e9 + i * 50 * MiB}) for i in range(1, 3000)]
    assert alerts(recs) == []


def test_restart_resolves_and_starts_the_history_over():
    recs = gpu_trace({0: total(healthy(), leak(8))}, 600, seed=10)
    restart_time = recs[-1].time + 60
    recs.append(from_obj({"type": "start", "run": "gpu-run", "rank": 0, "time": restart_time}))
    recs += [from_obj({"run": "gpu-run", "rank": 0, "time": restart_time + i, "step": 600 + i,
                       "gpu_mem_peak_bytes": 0.6 * T, "gpu_mem_total_bytes": T}) for i in range(1, 2000)]
    out = alerts(recs)
    assert [(a["state"], a["step"] if a["state"] == "resolved" else None) for a in out] == [
        ("firing", None), ("resolved", 0)]


def test_state_stays_bounded_over_a_long_run():
    p = Pipeline(default_detector_settings(), detectors=[GpuOomRisk])
    recs = gpu_trace({0: healthy()}, 50_000, seconds_per_step=0.1, seed=11)
    p.process(recs[:2000])
    d = p.detectors["gpu-run"][0]
    ring = d.ranks[0].ring
    p.process(recs[2000:])
    assert d.ranks[0].ring is ring and len(ring) == ring.size == GpuOomRiskSettings().window_buckets


def test_oom_without_a_message_still_says_what_happened():
    p = Pipeline(default_detector_settings(), detectors=[GpuOom])
    out = p.process([from_obj({"type": "oom", "run": "r", "rank": 0, "time": T0, "step": 5})]).alerts
    assert out[0]["summary"].startswith("rank 0 ran out of GPU memory at step 5: out of memory; peak ?")


def test_oom_record_fires_critical_with_message_and_numbers():
    p = Pipeline(default_detector_settings())
    p.process([from_obj({"type": "start", "run": "r", "rank": 3, "time": T0})])
    oom = {"type": "oom", "run": "r", "rank": 3, "time": T0 + 100, "step": 812,
           "message": "CUDA out of memory. Tried to allocate 2.00 GiB\nmore text",
           "gpu_mem_allocated_bytes": 78 * GiB, "gpu_mem_reserved_bytes": 79.5 * GiB,
           "gpu_mem_peak_bytes": 79.2 * GiB, "gpu_mem_total_bytes": 80 * GiB,
           "detail": "|===== PyTorch CUDA memory summary =====|"}
    out = p.process([from_obj(oom)]).alerts
    assert [(a["alert"], a["rank"], a["state"], a["severity"], a["step"]) for a in out] == [
        ("gpu_oom", 3, "firing", "critical", 812)]
    s = out[0]["summary"]
    assert "step 812" in s and "Tried to allocate 2.00 GiB more text; " in s  # the message whole, on one line
    assert "79.2 GiB" in s and "80.0 GiB" in s
    assert out[0]["gpu_mem_reserved_bytes"] == 79.5 * GiB and out[0]["has_detail"] is True
    assert p.runs["r"].ranks[3].last_oom["detail"] == oom["detail"]


def test_oom_resolves_after_restart_or_after_training_on():
    p = Pipeline(default_detector_settings(), detectors=[GpuOom])
    oom = lambda rank, step: from_obj({"type": "oom", "run": "r", "rank": rank, "time": T0 + step,  # noqa: E731
                                       "step": step})
    sample = lambda rank, step: from_obj({"run": "r", "rank": rank, "time": T0 + step, "step": step})  # noqa: E731
    assert [a["state"] for a in p.process([oom(0, 10), oom(1, 10)]).alerts] == ["firing", "firing"]
    assert p.process([sample(1, 50), sample(1, 109)]).alerts == []
    out = p.process([sample(1, 110)]).alerts
    assert [(a["rank"], a["state"]) for a in out] == [(1, "resolved")]
    out = p.process([from_obj({"type": "start", "run": "r", "rank": 0, "time": T0 + 500})]).alerts
    assert [(a["rank"], a["state"]) for a in out] == [(0, "resolved")]


def test_detectors_are_registered_and_configurable():
    names = {d.name for d in ALL}
    assert {"gpu_oom_risk", "gpu_oom"} <= names
    got = detector_settings({"gpu_oom_risk": {"horizon_steps": 500, "near_fraction": 0.9}})
    assert got["gpu_oom_risk"].horizon_steps == 500 and got["gpu_oom_risk"].near_fraction == 0.9


@pytest.mark.parametrize(("key", "value"), [
    ("near_fraction", 1.5), ("near_fraction", 0), ("horizon_steps", 0), ("horizon_steps", 1.5),
    ("horizon_seconds", -1), ("warmup_steps", -1), ("min_buckets", 3), ("window_buckets", 8),
    ("decel_ratio", float("nan")), ("enabled", "yes"),
])
def test_bad_gpu_settings_name_the_key_and_value(key, value):
    with pytest.raises(ValueError, match=rf"gpu_oom_risk\.{key}: .*{value!r}"):
        GpuOomRiskSettings(**{key: value})
    with pytest.raises(ValueError, match=rf"gpu_oom_risk\.{key}: "):  # the TOML path says the same
        detector_settings({"gpu_oom_risk": {key: value}})


def test_bad_oom_settings_name_the_key_and_value():
    with pytest.raises(ValueError, match=r"gpu_oom\.resolve_after_steps: .*0"):
        GpuOomSettings(resolve_after_steps=0)


# -- fast leaks, fragmentation, the OOM's own words ------------------------------------------------------------

H200 = 140 * GiB


def test_a_leak_filling_a_gpu_in_seconds_is_warned_before_it_runs_out():
    # measured on an H200: a leak filling 140 GiB in ~12 s; the 100-step warm-up could not warn before the OOM.
    # 10 steps a second, 1.2 GiB kept per step from step 1 on top of 20 GiB
    recs = gpu_trace({0: total(const(20 * GiB), linear(1.2 * GiB * PER_HOUR))}, 100, total_bytes=H200,
                     seconds_per_step=0.1, seed=20)
    out = alerts(recs)
    assert [(a["state"], a["cause"]) for a in out] == [("firing", "fast")]
    a = out[0]
    oom_step = (H200 - 20 * GiB) / (1.2 * GiB)  # the step it runs out at: 100
    assert a["step"] <= 40 and (oom_step - a["step"]) * 0.1 >= 5  # >= 5 s before the OOM
    truth = (oom_step - a["step"]) * 0.1
    assert 0.5 * truth <= a["seconds_to_oom"] <= 2 * truth
    assert a["rate_gib_per_second"] == pytest.approx(12, rel=0.1)


def fragmented(reserved_climb: bool, peak_rise: float = 0.0):
    """Peak allocated flat at 60 GiB (jitter); reserved climbing 62 -> 78 GiB of 80 over 1500 steps (or flat)."""
    def peak(step, r):
        return 60 * GiB + peak_rise * step + r.gauss(0, 0.2 * GiB)

    def reserved(step, r):
        return (62 + (16 * min(step, 1500) / 1500 if reserved_climb else 0)) * GiB

    import random
    rng = random.Random(21)
    recs = [from_obj({"type": "start", "run": "frag", "rank": 0, "time": T0})]
    for step in range(1, 2000):
        recs.append(from_obj({"run": "frag", "rank": 0, "time": T0 + step * 0.5, "step": step,
                              "gpu_mem_peak_bytes": peak(step, rng), "gpu_mem_reserved_bytes": reserved(step, rng),
                              "gpu_mem_allocated_bytes": 55 * GiB, "gpu_mem_total_bytes": T}))
    return recs


def test_reserved_memory_climbing_to_capacity_while_the_peak_stays_flat_is_fragmentation_with_its_fix():
    out = alerts(fragmented(True))
    assert [(a["state"], a["cause"], a["severity"]) for a in out] == [("firing", "fragmentation", "warning")]
    a = out[0]
    assert a["reserved_bytes"] >= 0.95 * T and a["peak_bytes"] < 61.5 * GiB
    assert a["fix"] == "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"
    assert "reserved but unallocated is fragmentation" in a["summary"] and a["summary"].endswith(
        "set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")


def test_reserved_memory_high_but_flat_is_not_fragmentation():
    assert alerts(fragmented(False)) == []  # a cache that holds 78% of the device and stays there


def test_the_oom_alert_quotes_pytorchs_message_whole_and_names_fragmentation():
    message = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.15 GiB of which "
               "1.21 GiB is free. Of the allocated memory 60.10 GiB is allocated by PyTorch, and 16.35 GiB is "
               "reserved by PyTorch but unallocated. If reserved but unallocated memory is large try setting "
               "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for "
               "Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)")
    p = Pipeline(default_detector_settings(), detectors=[GpuOom])
    out = p.process([from_obj({"type": "oom", "run": "r", "rank": 1, "time": T0, "step": 9, "message": message,
                               "gpu_mem_reserved_bytes": 76.4 * GiB, "gpu_mem_allocated_bytes": 60.1 * GiB,
                               "gpu_mem_total_bytes": 80 * GiB})]).alerts
    s = out[0]["summary"]
    assert " ".join(message.split()) in s and "expandable_segments:True to avoid fragmentation" in s
    assert out[0]["message"] == message
    # a message that does not say it: the numbers do
    out = p.process([from_obj({"type": "oom", "run": "r", "rank": 2, "time": T0, "step": 9,
                               "message": "CUDA out of memory. Tried to allocate 2.00 GiB",
                               "gpu_mem_reserved_bytes": 76.4 * GiB, "gpu_mem_allocated_bytes": 60.1 * GiB,
                               "gpu_mem_total_bytes": 80 * GiB})]).alerts
    assert "16.3 GiB reserved but unallocated is fragmentation: set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" \
        in out[0]["summary"]


@pytest.mark.parametrize("tau", [10, 25, 40])
def test_a_steep_warmup_at_ten_steps_a_second_is_not_a_fast_leak(tau):
    shape = total(const(0.4 * T), warmup(0.5 * T, tau), noise(0.002 * T))
    assert alerts(gpu_trace({0: shape, 1: shape}, 600, seconds_per_step=0.1, seed=22)) == []


def climb_back(to_gib: float):
    """H200, 10 steps a second at 20 GiB: one sample at 120 GiB at step 30 (after the fast path's start, a
    quarter of the warmup), then from step 40 eight samples rising 20 -> ``to_gib`` within 0.7 s."""
    recs = [from_obj({"type": "start", "run": "climb", "rank": 0, "time": T0})]
    for step in range(1, 80):
        k = step - 40
        peak = 120.0 if step == 30 else 20 + (to_gib - 20) * k / 7 if 0 <= k <= 7 else 20.0
        recs.append(from_obj({"run": "climb", "rank": 0, "time": T0 + step * 0.1, "step": step,
                              "gpu_mem_peak_bytes": peak * GiB, "gpu_mem_total_bytes": H200}))
    return recs


def test_a_fast_climb_back_to_an_earlier_high_is_no_new_high():
    # the eight rising samples would fill the GPU in under a second, but 115 GiB was seen before (120 GiB at
    # step 30): allocations that come and go, no leak
    assert alerts(climb_back(115)) == []


def test_a_fast_climb_past_an_earlier_high_by_the_minimum_rise_fires():
    out = alerts(climb_back(130))  # 10 GiB above the earlier high: more than 5% of 140 GiB
    assert [(a["state"], a["cause"], a["step"]) for a in out] == [("firing", "fast", 47)]
