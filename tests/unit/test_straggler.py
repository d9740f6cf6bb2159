"""straggler over generated traces: a rank waiting for data, a rank stepping slower, noisy healthy ranks.

Defaults under test: medians over 20 samples, 1.5x the peers' median and at
least 0.05 s and 10% of the step time more, held for 10 more samples; resolves
under 1.2x.
"""

from __future__ import annotations

import random
import re

import pytest
from trainhealth.config import detector_settings
from trainhealth.detectors.straggler import StragglerSettings, _median_without
from trainhealth.record import from_obj

from tests.live_traces import RUN, T0, brief, ddp_job, feed, lognormal

NAME = "straggler"


def stragglers(records, until=None, **kw):
    return feed(records, until=until, only=NAME, **kw)


def test_data_straggler_is_named_with_how_much_slower_and_resolves_when_it_catches_up():
    rng = random.Random(1)

    def data_time(rank, step):
        slow = rank == 2 and 200 <= step < 400
        return lognormal(rng, 0.3 if slow else 0.02, 0.3)

    job = ddp_job(ranks=4, steps=600, data_time=data_time)
    alerts = stragglers(job.records)
    assert brief(alerts)[0][:3] == (NAME, "firing", 2)
    assert [a["state"] for a in alerts] == ["firing", "resolved"]
    fired, caught_up = alerts
    # the median (of 20: the mean of the middle two) turns slow with the 10th slow sample (step 209),
    # seen at the next tick (ticks come every 2 steps), and must hold for 10 more samples
    assert 219 <= fired["step"] <= 221
    assert fired["signal"] == "data_time" and fired["severity"] == "warning"
    assert 10 < fired["ratio"] < 20
    assert fired["median_seconds"] == pytest.approx(0.3, rel=0.2)
    assert fired["peers_median_seconds"] == pytest.approx(0.02, rel=0.2)
    assert re.match(r"rank 2 is a straggler: it waits for data 0\.\d+ s \(median of its last 20 samples\), "
                    r"\d+\.\dx its peers' 0\.0\d+ s; the job loses about 0\.\d+ s per step", fired["summary"])
    # back to normal from step 400: the median is normal again after 11 normal samples
    assert 410 <= caught_up["step"] <= 413
    assert caught_up["summary"].startswith("rank 2 caught up: it now waits for data 0.0")


def test_noisy_healthy_data_times_stay_quiet():
    rng = random.Random(2)

    def data_time(rank, step):
        if step % 500 < 2:  # epoch boundary: every rank's DataLoader workers restart
            return rng.uniform(3.0, 6.0)
        if rank == 5 and rng.random() < 0.05:  # one rank with occasional slow reads
            return rng.uniform(0.5, 1.5)
        return lognormal(rng, 0.05, 0.6)

    step_times = {k: lognormal(rng, 0.4, 0.3) for k in range(1, 2001)}
    job = ddp_job(ranks=8, steps=2000, data_time=data_time, step_seconds=step_times.__getitem__,
                  step_offset=lambda r, k: rng.uniform(0.0, 0.05))
    assert stragglers(job.records) == []


def test_large_ratio_of_tiny_data_times_stays_quiet():
    job = ddp_job(ranks=2, steps=300, data_time=lambda r, k: 0.004 if r == 1 else 0.001)
    assert stragglers(job.records) == []


def test_excess_that_is_small_against_a_long_step_stays_quiet():
    # rank 1 waits 0.6 s more per step: 6% of a 10 s step (quiet), 30% of a 2 s step (fires)
    def data_time(rank, step):
        return 0.9 if rank == 1 else 0.3

    long_steps = ddp_job(ranks=3, steps=100, step_seconds=10.0, data_time=data_time)
    assert stragglers(long_steps.records) == []
    short_steps = ddp_job(ranks=3, steps=100, step_seconds=2.0, data_time=data_time)
    assert brief(stragglers(short_steps.records)) == [(NAME, "firing", 1, 30)]


def test_single_rank_is_never_a_straggler():
    job = ddp_job(ranks=1, steps=300, data_time=lambda r, k: 5.0 if k > 100 else 0.01)
    assert stragglers(job.records) == []


def samples(rank, seconds_per_step, steps, every=1, t0=T0):
    return [from_obj({"run": RUN, "rank": rank, "time": t0 + seconds_per_step * k, "step": k, "loss": 1.0})
            for k in range(every, steps + 1, every)]


def test_rank_that_steps_slower_than_unsynchronised_peers_is_named():
    # ranks that do not all-reduce every step (independent workers): rank 3 takes 0.9 s per step,
    # the others 0.5 s; everyone samples every 5 steps, so per-step intervals are compared
    records = [r for rank in (0, 1, 2) for r in samples(rank, 0.5, 600, every=5)]
    records += samples(3, 0.9, 330, every=5)
    records.sort(key=lambda r: r.time)
    alerts = stragglers(records)
    assert brief(alerts) == [(NAME, "firing", 3, alerts[0]["step"])]
    assert alerts[0]["signal"] == "step_interval"
    assert alerts[0]["ratio"] == pytest.approx(1.8)
    assert "rank 3 is a straggler: it takes per step 0.900 s" in alerts[0]["summary"]


def test_ranks_sampling_every_tenth_step_in_sync_stay_quiet():
    records = [r for rank in range(4) for r in samples(rank, 0.5 + 0.001 * rank, 2000, every=10)]
    records.sort(key=lambda r: r.time)
    assert stragglers(records) == []


def test_restart_resolves_and_forgets_the_slow_window():
    job = ddp_job(ranks=3, steps=200, data_time=lambda r, k: 0.5 if r == 0 else 0.02)
    restart = from_obj({"type": "start", "run": RUN, "rank": 0, "time": job.t(200) + 5, "world_size": 3})
    alerts = stragglers(job.records + [restart])
    assert brief(alerts) == [(NAME, "firing", 0, alerts[0]["step"]), (NAME, "resolved", 0, 200)]
    assert alerts[1]["summary"] == "rank 0 started again; no longer compared as a straggler"


def test_end_resolves_an_open_straggler():
    job = ddp_job(ranks=3, steps=200, data_time=lambda r, k: 0.5 if r == 0 else 0.02, end=[0])
    alerts = stragglers(job.records)
    assert [a["state"] for a in alerts] == ["firing", "resolved"]
    assert alerts[1]["summary"] == "rank 0 ended; no longer compared as a straggler"


def test_leave_one_out_median():
    s = [1.0, 2.0, 3.0, 10.0]
    assert [_median_without(s, i) for i in range(4)] == [3.0, 3.0, 2.0, 2.0]
    assert [_median_without([1.0, 5.0], i) for i in range(2)] == [5.0, 1.0]
    assert _median_without([1.0, 2.0, 4.0], 1) == 2.5


@pytest.mark.parametrize("values, message", [
    ({"window": 2}, "straggler.window: must be an integer >= 3, got 2"),
    ({"ratio": 1.0}, "straggler.ratio: must be > 1, got 1.0"),
    ({"resolve_ratio": 2.0}, "straggler.resolve_ratio: must be between 1 and ratio (1.5), got 2.0"),
    ({"min_excess_seconds": -0.1}, "straggler.min_excess_seconds: must be a number >= 0, got -0.1"),
    ({"sustain_samples": 2.5}, "straggler.sustain_samples: must be an integer >= 0, got 2.5"),
])
def test_bad_settings_are_refused_naming_key_and_value(values, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        StragglerSettings(**values)
    with pytest.raises(ValueError, match=re.escape(message)):
        detector_settings({NAME: values})


# -- synchronous training: compute against collective wait ------------------------------------------------

def sync_job(ranks, steps, compute, step_seconds=None, heartbeats=None, hosts="abcdefgh"):
    """Synchronous DDP as the client reports it: every rank's step takes as long as the slowest rank's
    compute (plus the all-reduce, 10 ms), so step times are equal; each rank waits the difference.
    compute(rank, step) -> seconds; heartbeats(rank, step) -> gpu_health or None."""
    out = [{"type": "start", "run": RUN, "rank": r, "time": T0 + 0.01 * r, "world_size": ranks,
            "host": f"node-{hosts[r]}"} for r in range(ranks)]
    t = T0 + 5.0
    for k in range(1, steps + 1):
        c = {r: compute(r, k) for r in range(ranks)}
        step = step_seconds(k) if step_seconds else max(c.values()) + 0.01
        t += step
        for r in range(ranks):
            out.append({"run": RUN, "rank": r, "time": t + 0.001 * r, "step": k, "loss": 1.0,
                        "step_time_seconds": step, "data_time_seconds": 0.002, "compute_seconds": c[r],
                        "comm_wait_seconds": max(0.0, step - 0.002 - c[r])})
            health = heartbeats(r, k) if heartbeats else None
            if health is not None:
                out.append({"type": "heartbeat", "run": RUN, "rank": r, "time": t + 0.002, "step": k,
                            "gpu_health": health})
    return [from_obj(o) for o in sorted(out, key=lambda o: o["time"])]


def test_rank_computing_slowly_while_the_others_wait_is_named_though_step_times_are_equal():
    rng = random.Random(3)

    def compute(rank, step):
        slow = rank == 2 and step > 100
        return lognormal(rng, 0.3 if slow else 0.1, 0.1)

    records = sync_job(4, 300, compute)
    alerts = stragglers(records)
    assert brief(alerts)[:1] == [(NAME, "firing", 2, alerts[0]["step"])] and len(alerts) == 1
    a = alerts[0]
    assert 120 <= a["step"] <= 124  # the median turns with the 11th slow sample, then 10 more
    assert a["signal"] == "compute" and a["ratio"] == pytest.approx(3.0, rel=0.15)
    assert a["peers_comm_wait_seconds"] == pytest.approx(0.2, rel=0.2)
    assert re.match(r"rank 2 is a straggler: it computes 0\.\d{3} s \(median of its last 20 samples\), "
                    r"\d\.\dx its peers' 0\.\d+ s, while they wait 0\.\d+ s per step in their collectives; "
                    r"the job loses about 0\.\d+ s per step waiting for it \(a slow GPU or CPU", a["summary"])


def test_a_throttling_gpu_is_said_in_the_same_alert():
    def compute(rank, step):
        return 0.25 if rank == 1 and step > 50 else 0.1

    def health(rank, step):
        throttled = rank == 1 and step > 50
        return {"index": 3, "pci_bus_id": "00000000:65:00.0", "throttle_reasons": 0x8 if throttled else 0,
                "sm_clock_mhz": 705.0 if throttled else 1980.0, "sm_clock_max_mhz": 1980.0}

    alerts = stragglers(sync_job(3, 150, compute, heartbeats=health))
    assert brief(alerts)[0][:3] == (NAME, "firing", 1) and len(alerts) == 1
    assert alerts[0]["summary"].endswith("; its GPU is throttling: node-b GPU 3 (00000000:65:00.0): "
                                         "HW slowdown, SM clock 705/1980 MHz")
    assert alerts[0]["gpu_throttling"] == "GPU 3 (00000000:65:00.0): HW slowdown, SM clock 705/1980 MHz"


def test_noisy_compute_and_a_checkpoint_pause_on_every_rank_stay_quiet():
    rng = random.Random(4)

    def compute(rank, step):
        if step % 100 == 0:  # a checkpoint save inside the step, on every rank at once
            return rng.uniform(3.0, 6.0)
        if rng.random() < 0.05:  # now and then a slow step on any rank (a page fault, a GC)
            return rng.uniform(0.3, 0.8)
        return lognormal(rng, 0.1, 0.3)

    assert stragglers(sync_job(8, 600, compute)) == []


def test_longer_compute_that_nobody_waits_for_stays_quiet():
    # rank 0 computes more by design (it also evaluates), but the ranks do not wait for each other here:
    # every step is its own length and no one reports waiting in a collective
    records = sync_job(3, 200, lambda r, k: 0.3 if r == 0 else 0.1, step_seconds=lambda k: 0.35)
    records = [r if r.type != "sample" else from_obj({**{"run": r.run, "rank": r.rank, "time": r.time,
                                                        "step": r.step, "compute_seconds": r.compute_seconds,
                                                        "comm_wait_seconds": 0.0,
                                                        "step_time_seconds": r.step_time_seconds}})
               for r in records]
    assert stragglers(records) == []
