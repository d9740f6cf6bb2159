"""rank_stalled over generated traces: hangs, dead ranks, slow steps, checkpoint pauses, run end.

Defaults under test: floor 180 s, 3x the longest step interval seen, silence
floor 60 s for heartbeating ranks, 600 s before a rank's first step.
"""

from __future__ import annotations

import json
import random
import re

import pytest
from trainhealth import cli
from trainhealth.config import ConfigError, detector_settings
from trainhealth.detectors.liveness import RankStalledSettings
from trainhealth.record import from_obj

from tests import live_traces
from tests.live_traces import RUN, T0, brief, ddp_job, feed, lognormal, settings, shifted, write_jsonl

NAME = "rank_stalled"


def stalled(records, until=None, **kw):
    return feed(records, until=until, only=NAME, **kw)


def now_open():
    """The run's open rank_stalled alert as it stands after the latest feed() (refreshed in place)."""
    (alert,) = [a for a in live_traces.last_pipeline.book.open.values() if a["alert"] == NAME]
    return alert


def findings():
    return live_traces.last_pipeline.findings(RUN).get(NAME, {})


# -- hangs ------------------------------------------------------------------
def test_hang_with_heartbeats_names_the_rank_that_stopped_first():
    # rank 1 stalls after its optimizer step, before it reports step 300; rank 0 reports 300 and
    # blocks in the next all-reduce. Heartbeats go on for both.
    job = ddp_job(ranks=2, steps=300, last_step={1: 299}, until=T0 + 700)
    alerts = stalled(job.records, until=T0 + 700)
    assert brief(alerts) == [(NAME, "firing", None, 299)]  # one incident for the run, not one per rank
    (first,) = alerts
    assert first["time"] == pytest.approx(job.t(299) + 0.001 + 180)
    assert first["first_rank"] == 1 and first["root_ranks"] == [1] and first["waiting_ranks"] == [0]
    assert first["reason"] == "stuck" and first["severity"] == "critical"
    assert first["summary"].startswith("rank 1 is stuck after step 299: no step finished for 180 s "
                                       "while its heartbeats continue")
    assert "rank 1 stopped first (at step 299; rank 0 reached 300 and waits in a collective)" in \
        first["summary"]
    assert first["time"] - first["last_step_time"] <= 300  # within 5 minutes on sub-second steps
    # rank 0 crosses its own limit later: the same alert lists it, nobody is paged again
    assert now_open()["stuck_ranks"] == [0, 1] and now_open()["fingerprint"] == "job/-/rank_stalled"


def test_hang_at_the_same_step_on_every_rank_says_the_blocker_is_unknown():
    job = ddp_job(ranks=4, steps=300, until=T0 + 700)
    alerts = stalled(job.records, until=T0 + 700)
    assert brief(alerts) == [(NAME, "firing", None, 300)]
    assert alerts[0]["first_rank"] is None and alerts[0]["root_ranks"] == []
    assert alerts[0]["stuck_ranks"] == [0, 1, 2, 3]
    assert "all 4 ranks stand at step 300: no step finished for 180 s; the rank that blocks the others " \
        "cannot be told" in alerts[0]["summary"]


def test_dead_rank_is_named_missing_and_resolves_on_restart():
    # rank 1 is killed at T0+200: no more heartbeats; ranks 0 and 2 block at step 201 and keep beating
    job = ddp_job(ranks=3, steps=300, last_step={0: 201, 1: 200, 2: 201}, silent_at={1: T0 + 200},
                  until=T0 + 400)
    last_seen_1 = max(r.time for r in job.records if r.rank == 1)
    again = ddp_job(ranks=3, steps=260, first_step=201, t0=T0 + 420, startup=20.0)
    alerts = stalled(job.records + again.records, until=T0 + 480)
    assert brief(alerts) == [(NAME, "firing", None, 200), (NAME, "resolved", None, 200)]
    dead, back = alerts
    assert dead["reason"] == "silent" and dead["first_rank"] == 1 and dead["root_ranks"] == [1]
    assert dead["time"] == pytest.approx(last_seen_1 + 60)
    assert dead["summary"].startswith("rank 1 went silent after step 200: nothing from it for 60 s")
    assert "; ranks 0, 2 wait in a collective;" in dead["summary"]
    assert dead["waiting_ranks"] == [0, 2] and dead["stuck_ranks"] == []
    assert back["time"] == pytest.approx(T0 + 420.02)  # the last rank to start again
    assert "rank 2 started again; no rank is stalled any more" in back["summary"]


def test_frozen_rank_resolves_when_its_steps_advance():
    # rank 1 is frozen (SIGSTOP) from T0+100 to T0+400: nothing from it, the others block.
    job = ddp_job(ranks=2, steps=200, last_step={0: 191, 1: 190}, silent_at={1: T0 + 101},
                  until=T0 + 420)
    resumed = [from_obj({"type": "heartbeat", "run": RUN, "rank": 1, "time": T0 + 400, "step": 190})]
    steps = [from_obj({"run": RUN, "rank": r, "time": T0 + 410 + 0.5 * k + 0.001 * r, "step": 190 + k})
             for k in range(1, 6) for r in (0, 1) if 190 + k > (191 if r == 0 else 190)]
    alerts = stalled(sorted(job.records + resumed + steps, key=lambda r: r.time), until=T0 + 420)
    assert brief(alerts) == [(NAME, "firing", None, 190), (NAME, "resolved", None, 190)]
    assert alerts[0]["root_ranks"] == [1]
    # the heartbeat at T0+400 alone does not resolve rank 1: its step is still stuck; rank 0 advances
    # at 411.0, rank 1 at 410.501: the last stalled rank to advance resolves the incident
    assert alerts[1]["time"] == pytest.approx(T0 + 411.0)
    assert "rank 0 advanced to step 192" in alerts[1]["summary"]


def test_heartbeat_with_an_older_step_than_the_last_sample_changes_nothing():
    # the heartbeat thread read step 99 just before the training thread recorded step 100
    job = ddp_job(ranks=1, steps=100, until=T0 + 400)
    late = from_obj({"type": "heartbeat", "run": RUN, "rank": 0, "time": job.t(100) + 0.01, "step": 99})
    alerts = stalled(sorted(job.records + [late], key=lambda r: r.time), until=T0 + 400)
    assert brief(alerts) == [(NAME, "firing", None, 100)]
    assert alerts[0]["time"] == pytest.approx(job.t(100) + 180)


def test_restart_without_a_start_record_is_a_new_baseline():
    # samples go back from step 100 to 1 (restarted from scratch, 2 s steps): step 100 is passed
    # again 280 s later, but this is no hang
    before = ddp_job(ranks=1, steps=100, until=T0 + 60)
    after = ddp_job(ranks=1, steps=150, step_seconds=2.0, t0=T0 + 70, start=False)
    alerts = stalled(before.records + after.records, until=after.t(150))
    assert alerts == []


def test_rank_without_heartbeats_that_stops_is_silent_after_the_step_limit():
    job = ddp_job(ranks=2, steps=100, heartbeat=None)
    alerts = stalled(job.records, until=job.t(100) + 400)
    assert brief(alerts) == [(NAME, "firing", None, 100)]
    assert alerts[0]["reason"] == "silent" and now_open()["silent_ranks"] == [0, 1]
    assert alerts[0]["time"] == pytest.approx(job.t(100) + 180)
    assert "every rank went silent within 0.0 s; all 2 ranks stand at step 100" in alerts[0]["summary"]


def test_whole_job_killed_without_end_goes_silent_on_every_rank():
    job = ddp_job(ranks=2, steps=100, until=T0 + 100)
    last = {r: max(x.time for x in job.records if x.rank == r) for r in (0, 1)}
    alerts = stalled(job.records, until=T0 + 300)
    assert brief(alerts) == [(NAME, "firing", None, 100)]
    assert alerts[0]["time"] == pytest.approx(last[0] + 60)
    assert alerts[0]["first_rank"] is None and alerts[0]["silent_ranks"] == [0]
    assert now_open()["silent_ranks"] == [0, 1]  # rank 1 crossed its limit a moment later: same alert


# -- phases: which rank blocks the others when all stand at one step ---------------------------
def with_phases(job, hung_at: int, phases: dict[int, tuple[str | None, float]]):
    """The job's heartbeats with phases, as the client sends them: "step" (begun 0.1 s before the
    heartbeat) while training, then after step ``hung_at`` rank -> (phase, seconds after that step)."""
    out = []
    for rec in job.records:
        if rec.type == "heartbeat":
            if rec.time <= job.t(hung_at):
                rec = shifted([rec], phase="step", phase_time=rec.time - 0.1)[0]
            elif phases[rec.rank][0] is not None:
                name, after = phases[rec.rank]
                rec = shifted([rec], phase=name, phase_time=job.t(hung_at) + after)[0]
        out.append(rec)
    return out


def test_hang_in_data_loading_names_the_rank_waiting_for_data():
    # rank 2's DataLoader deadlocks after step 300; ranks 0, 1, 3 got their batch and block in the
    # all-reduce of step 301: every rank completed step 300 and keeps heartbeating
    job = ddp_job(ranks=4, steps=300, until=T0 + 700)
    phases = {0: ("step", 0.01), 1: ("step", 0.011), 2: ("data", 0.002), 3: ("step", 0.013)}
    alerts = stalled(with_phases(job, 300, phases), until=T0 + 700)
    assert brief(alerts) == [(NAME, "firing", None, 300)]
    (a,) = alerts
    assert a["first_rank"] == 2 and a["root_ranks"] == [2] and a["waiting_ranks"] == [0, 1, 3]
    assert a["phase"] == "data" and a["phase_time"] == pytest.approx(job.t(300) + 0.002)
    assert a["summary"].startswith(
        "rank 2 has been waiting for data since step 300 (rank 2 for 180 s) while the other 3 ranks wait in "
        "the step's collectives: check its DataLoader/storage; py-spy dump its workers; limit 180 s")


def test_two_ranks_waiting_for_data_name_the_one_waiting_longest():
    job = ddp_job(ranks=4, steps=300, until=T0 + 700)
    phases = {0: ("step", 0.01), 1: ("data", 0.003), 2: ("step", 0.012), 3: ("data", 0.001)}
    alerts = stalled(with_phases(job, 300, phases), until=T0 + 700)
    assert [a["first_rank"] for a in alerts] == [1] and alerts[0]["root_ranks"] == [1, 3]
    assert ("ranks 1, 3 have been waiting for data since step 300 (rank 3 for 180 s) while the other 2 "
            "ranks wait in the step's collectives: check their DataLoader/storage") in alerts[0]["summary"]


def test_loop_that_marks_only_data_loading_still_names_the_rank_waiting_for_data():
    # the others' heartbeats carry no phase: record() ended their step and they are not waiting for data
    job = ddp_job(ranks=2, steps=300, until=T0 + 700)
    alerts = stalled(with_phases(job, 300, {0: (None, 0.0), 1: ("data", 0.001)}), until=T0 + 700)
    assert [a["first_rank"] for a in alerts] == [1]
    assert "rank 1 has been waiting for data since step 300 (rank 1 for 180 s) while the other rank waits" \
        in alerts[0]["summary"]


def test_hang_with_every_rank_in_the_step_still_cannot_name_the_blocker():
    job = ddp_job(ranks=4, steps=300, until=T0 + 700)
    alerts = stalled(with_phases(job, 300, {r: ("step", 0.01) for r in range(4)}), until=T0 + 700)
    assert brief(alerts) == [(NAME, "firing", None, 300)]
    assert alerts[0]["first_rank"] is None
    assert "the rank that blocks the others cannot be told" in alerts[0]["summary"]


def test_every_rank_waiting_for_data_points_at_shared_storage_without_a_first_rank():
    job = ddp_job(ranks=2, steps=300, until=T0 + 700)
    alerts = stalled(with_phases(job, 300, {0: ("data", 0.001), 1: ("data", 0.002)}), until=T0 + 700)
    assert [a["first_rank"] for a in alerts] == [None]
    assert ("all 2 ranks have been waiting for data since step 300 (rank 0 for 180 s): check the shared "
            "storage or input pipeline") in alerts[0]["summary"]


def test_a_newer_heartbeat_without_phase_clears_an_old_data_phase():
    # rank 1's client was replaced by one without phases (or the phase ended): its old "data" is not now
    job = ddp_job(ranks=2, steps=300, until=T0 + 700)
    records = [r for r in with_phases(job, 300, {0: ("step", 0.01), 1: ("data", 0.001)})
               if not (r.rank == 1 and r.type == "heartbeat" and r.time > job.t(300) + 100)]
    records += [from_obj({"type": "heartbeat", "run": RUN, "rank": 1, "time": t, "step": 300})
                for t in range(int(job.t(300)) + 101, int(T0) + 700, 5)]
    alerts = stalled(sorted(records, key=lambda r: r.time), until=T0 + 700)
    assert [a["first_rank"] for a in alerts] == [None]
    assert "cannot be told from steps" in alerts[0]["summary"]


def test_hang_behind_at_a_lower_step_is_named_by_step_whatever_the_phases():
    job = ddp_job(ranks=2, steps=300, last_step={1: 299}, until=T0 + 700)
    records = [shifted([r], phase="data", phase_time=r.time - 1)[0] if r.rank == 0 and r.type == "heartbeat"
               else r for r in job.records]
    alerts = stalled(records, until=T0 + 700)
    assert [a["first_rank"] for a in alerts] == [1]


def test_healthy_run_with_phases_stays_quiet():
    job = ddp_job(ranks=4, steps=400, step_seconds=0.5)
    records = [shifted([r], phase="data" if r.rank % 2 else "step", phase_time=r.time - 0.2)[0]
               if r.type == "heartbeat" else r for r in job.records]
    assert stalled(records, until=job.t(400)) == []


# -- healthy runs that look alarming ------------------------------------------
def test_slow_90s_steps_with_heartbeats_stay_quiet():
    job = ddp_job(ranks=2, steps=30, step_seconds=90.0, until=T0 + 2800)
    assert job.t(30) == T0 + 2705
    assert stalled(job.records, until=T0 + 2800) == []  # 95 s into the next step: not hung


def test_hang_on_90s_steps_fires_after_three_step_times():
    job = ddp_job(ranks=2, steps=10, step_seconds=90.0, until=T0 + 1500)
    alerts = stalled(job.records, until=T0 + 1500)
    assert brief(alerts) == [(NAME, "firing", None, 10)]
    assert alerts[0]["time"] == pytest.approx(job.t(10) + 270)
    assert alerts[0]["threshold_seconds"] == pytest.approx(270)
    assert alerts[0]["typical_step_interval_seconds"] == pytest.approx(90)


def test_periodic_checkpoint_pauses_stay_quiet():
    # 60 s saves every 200 steps, then longer ones (150 s, 170 s): each below the learned limit
    pauses = {101: 60.0, 301: 60.0, 501: 150.0, 701: 170.0, 901: 60.0}
    job = ddp_job(ranks=4, steps=1000, pauses=pauses)
    assert stalled(job.records) == []


def test_hang_after_a_checkpoint_pause_fires_within_five_minutes():
    job = ddp_job(ranks=2, steps=500, pauses={101: 60.0, 301: 60.0}, until=T0 + 1200)
    alerts = stalled(job.records, until=T0 + 1200)
    assert brief(alerts) == [(NAME, "firing", None, 500)]
    assert alerts[0]["time"] - job.t(500) == pytest.approx(181.5)  # 3 x (60 s save + 0.5 s step)
    assert alerts[0]["time"] - job.t(500) <= 300


def test_unseen_long_pause_fires_once_then_raises_the_limit():
    job = ddp_job(ranks=2, steps=600, pauses={101: 240.0, 301: 240.0, 501: 300.0}, until=T0 + 2500)
    alerts = stalled(job.records, until=T0 + 2500)
    assert brief(alerts) == [(NAME, "firing", None, 100), (NAME, "resolved", None, 100),
                             (NAME, "firing", None, 600)]
    assert alerts[0]["time"] == pytest.approx(job.t(100) + 180)
    assert alerts[1]["time"] == pytest.approx(job.t(101) + 0.001)  # when the last rank advanced
    assert "the stall limit is now 722 s (longest step interval seen 240.5 s)" in alerts[1]["summary"]
    # the learned limit is 3 x the longest pause (300.5 s), below the 1800 s ceiling
    assert alerts[2]["time"] == pytest.approx(job.t(600) + 901.5)


def test_slow_start_within_the_startup_limit_stays_quiet():
    job = ddp_job(ranks=2, steps=50, startup=500.0)
    assert stalled(job.records, until=job.t(50) + 10) == []


def test_rank_that_never_finishes_a_step_fires_after_the_startup_limit():
    job = ddp_job(ranks=2, steps=0, until=T0 + 700)
    alerts = stalled(job.records, until=T0 + 700)
    assert brief(alerts) == [(NAME, "firing", None, 0)]
    assert [a["time"] for a in alerts] == pytest.approx([T0 + 600])
    assert "no step finished since it started" in alerts[0]["summary"]


def test_noisy_healthy_ranks_stay_quiet():
    rng = random.Random(7)
    slow = {k: rng.uniform(10, 40) for k in rng.sample(range(50, 3000), 15)}  # evals, GC, slow I/O
    times = {k: lognormal(rng, 0.4, 0.6) + slow.get(k, 0.0) for k in range(1, 3001)}
    offsets = {(r, k): rng.uniform(0, 0.05) for r in range(8) for k in range(1, 3001)}
    job = ddp_job(ranks=8, steps=3000, step_seconds=times.__getitem__, pauses={1500: 90.0},
                  step_offset=lambda r, k: offsets[r, k],
                  data_time=lambda r, k: lognormal(rng, 0.02, 0.5), end=True)
    assert feed(job.records, until=job.t(3000) + 1000) == []


# -- the end of a run ---------------------------------------------------------
def test_run_end_is_finished_not_dead():
    # the heartbeat thread beats for 30 s after `end`, then the processes exit
    job = ddp_job(ranks=2, steps=100, end=True, until=T0 + 85)
    assert max(r.time for r in job.records if r.type == "heartbeat") > job.t(100) + 20
    assert stalled(job.records, until=T0 + 3000) == []


def test_end_from_rank_zero_alone_finishes_every_rank():
    job = ddp_job(ranks=4, steps=100, end=[0], until=T0 + 60)
    assert stalled(job.records, until=T0 + 3000) == []


def test_end_resolves_an_open_alert():
    job = ddp_job(ranks=2, steps=100, last_step={1: 99}, until=T0 + 400)
    ends = [from_obj({"type": "end", "run": RUN, "rank": r, "time": T0 + 410 + r, "step": 100 - r})
            for r in (0, 1)]
    alerts = stalled(job.records + ends, until=T0 + 1000)
    # rank 0's end finishes the run: rank 1 (at step 99, below the end step) is finished too
    assert brief(alerts) == [(NAME, "firing", None, 99), (NAME, "resolved", None, 99)]
    assert alerts[1]["time"] == T0 + 410
    assert alerts[1]["summary"] == "rank 0 ended: the run ended at step 100, no rank is stalled"


def test_elastic_shrink_retires_the_rank_that_left():
    before = ddp_job(ranks=4, steps=100, until=T0 + 55)
    after = ddp_job(ranks=3, steps=400, first_step=101, t0=T0 + 60, world_size=3)
    assert stalled(before.records + after.records, until=after.t(400)) == []


# -- server and replay agree ----------------------------------------------------
def replay_cli(path, *args, capsys):
    """The transitions replay prints (its refresh lines left out: the server's transitions are compared)."""
    assert cli.main(["replay", path, *args], environ={}) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    return [a for a in lines if "refreshed" not in a]


def key(alerts):
    return [(a["alert"], a["state"], a["rank"], a["step"], round(a["time"], 3), a.get("first_rank"))
            for a in alerts]


def test_replay_gives_the_alerts_the_server_timer_gives(tmp_path, capsys):
    hung = ddp_job(ranks=4, steps=400, last_step={2: 399}, silent_at={3: T0 + 250}, until=T0 + 700)
    path = write_jsonl(tmp_path / "run.jsonl", hung.records)
    served = stalled(hung.records, until=T0 + 700)  # a timer tick every second, one record per request
    replayed = [a for a in replay_cli(path, capsys=capsys) if a["alert"] == NAME]
    assert len(served) == 1 and served[0]["first_rank"] == 3 and served[0]["reason"] == "silent"
    assert key(replayed) == key(served)


def test_replay_until_reports_a_hang_at_the_end_of_the_recording(tmp_path, capsys):
    # the recording stops 60 s into a hang (heartbeats until then): nothing fired yet
    job = ddp_job(ranks=2, steps=200, last_step={0: 199}, until=T0 + 165)
    path = write_jsonl(tmp_path / "run.jsonl", job.records)
    assert replay_cli(path, capsys=capsys) == []
    # after it nothing more comes: as far as anyone can tell, every rank went silent
    alerts = replay_cli(path, "--until", "300", capsys=capsys)
    last = {r: max(x.time for x in job.records if x.rank == r) for r in (0, 1)}
    assert brief(alerts) == [(NAME, "firing", None, 199)]
    assert [a["time"] for a in alerts] == pytest.approx([last[0] + 60])
    assert [a["reason"] for a in alerts] == ["silent"]
    assert [a["first_rank"] for a in alerts] == [0]
    assert alerts[0]["summary"].startswith("every rank went silent within 0.5 s; rank 0 stopped first (at "
                                           "step 199; rank 1 reached 200); ")


# -- settings ------------------------------------------------------------------
@pytest.mark.parametrize("values, message", [
    ({"floor_seconds": -1}, "rank_stalled.floor_seconds: must be a positive number, got -1"),
    ({"factor": 0.5}, "rank_stalled.factor: must be >= 1, got 0.5"),
    ({"floor_seconds": 600, "ceiling_seconds": 300}, "rank_stalled.ceiling_seconds: must be >= floor"),
    ({"silence_floor_seconds": "60"}, "rank_stalled.silence_floor_seconds: must be a positive number"),
    ({"enabled": 1}, "rank_stalled.enabled: must be true or false, got 1"),
])
def test_bad_settings_are_refused_naming_key_and_value(values, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        RankStalledSettings(**values)
    with pytest.raises(ValueError, match=re.escape(message)):
        detector_settings({NAME: values})  # the [detectors.rank_stalled] table of the TOML file


def test_unknown_setting_is_refused():
    with pytest.raises(ConfigError, match="detectors.rank_stalled.flooor_seconds: unknown setting"):
        detector_settings({NAME: {"flooor_seconds": 1}})


def test_smaller_limits_from_config_fire_sooner():
    job = ddp_job(ranks=2, steps=100, until=T0 + 200)
    quick = settings(rank_stalled={"floor_seconds": 5.0, "silence_floor_seconds": 3.0})
    alerts = stalled(job.records, until=T0 + 200, detector_settings=quick)
    assert [a["time"] for a in alerts] == pytest.approx([job.t(100) + 5])


def test_a_whole_large_job_stalling_at_once_costs_a_linear_scan_per_tick_not_one_per_alert(monkeypatch):
    # One sidecar per job, 2048 ranks, all killed at once: the timer tick that fired 2048 alerts ran the
    # event loop for seconds (every alert re-sorted all ranks to name the first); now one alert names
    # them all, from a few linear scans. Counted, not timed.
    from trainhealth.config import Limits, default_detector_settings
    from trainhealth.detectors.liveness import RankStalled
    from trainhealth.pipeline import Pipeline

    n = 2048
    p = Pipeline(default_detector_settings(), Limits(max_ranks_per_run=n))
    p.process([from_obj({"run": "big", "rank": k, "time": 1000.0 + s, "step": s, "type": "heartbeat"})
               for s in range(3) for k in range(n)])
    calls = 0
    real = RankStalled.silence_limit

    def counted(self, r):
        nonlocal calls
        calls += 1
        return real(self, r)

    monkeypatch.setattr(RankStalled, "silence_limit", counted)
    out = [a for a in p.tick_wall(2000.0) if a["alert"] == NAME]
    assert len(out) == 1 and out[0]["reason"] == "silent" and len(out[0]["silent_ranks"]) == n
    assert out[0]["first_rank"] is None  # all went silent together at the same step
    assert "every rank went silent within 0.0 s; all 2048 ranks stand at step 2" in out[0]["summary"]
    assert calls <= 3 * n
