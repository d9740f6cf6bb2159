"""Incidents on-call can live with (issue 23): one incident per divergence with its cause inside, told from the
first steps, advice that fits, nothing stale once a run ends, and one text everywhere.

Replays of generated traces through the real Pipeline (tests/unit/traces.py), and the real Service for the
reload, the console and the stop a client hears. ``pages``: the firing transitions, each one a notification.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from trainhealth.config import default_detector_settings, load
from trainhealth.notify.console import ConsoleLog
from trainhealth.pipeline import Pipeline
from trainhealth.record import Record, from_obj
from trainhealth.service import Service

from .traces import RUN, SentAlerts, healthy, merge, run_pipeline, samples, start, with_amp

SPIKES = ("loss_spike", "grad_explosion")


def pages(alerts: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(a["alert"], a["severity"]) for a in alerts if a["state"] == "firing"]


def live(pipeline: Pipeline) -> list[dict[str, Any]]:
    return pipeline.book.firing(RUN)


def end(rank: int, time: float, step: int, status: str = "completed") -> Record:
    return from_obj({"type": "end", "run": RUN, "rank": rank, "time": time, "step": step, "status": status})


def diverging_ddp(ranks: int = 8, before: int = 300, lr: float = 0.1, factor: float = 20.0,
                  resume: bool = True, batch: int | None = 32) -> tuple[list[Record], int]:
    """An 8-rank DDP job (one all-reduced grad norm) resumed at step ``before`` with its LR raised ``factor``x:
    loss and grad norm rise from the next step until they overflow; the NaN reaches every rank at one step.
    ``batch``: the starts' batch_size (None: lr_scaling has nothing to judge). Returns (records, the NaN step)."""
    sizes = {} if batch is None else {"batch_size": batch}
    rng = np.random.default_rng(0)
    steps = before + 60
    grad = list(1.0 * np.exp(0.2 * rng.standard_normal(steps)))
    traces = [healthy(steps, seed=q, peak_lr=lr) for q in range(ranks)]
    nan_step = 0
    for k in range(before, steps):  # index k is step k + 1
        up = k - before + 1
        grad[k] = grad[k] * 4.0 ** up
        if grad[k] > 1e30:
            nan_step = nan_step or k + 1
            grad[k] = math.nan
    for t in traces:
        t["lr"] = [lr if k < before else lr * factor for k in range(steps)]
        t["grad_norm"] = grad
        t["loss"] = [x * (1.4 ** (k - before + 1) if k >= before else 1.0) for k, x in enumerate(t["loss"])]
        t["loss"] = [math.nan if k + 1 >= nan_step else x for k, x in enumerate(t["loss"])]
    records = [start(q, time=900.0, world_size=ranks, lr=lr, **sizes) for q in range(ranks)]
    records += merge(*(samples({c: v[:before] for c, v in t.items()}, rank=q) for q, t in enumerate(traces)))
    if resume:
        t_resume = 1000.0 + before * 0.5 + 1.0
        records += [start(q, time=t_resume, world_size=ranks, lr=lr * factor, **sizes) for q in range(ranks)]
    records += merge(*(samples({c: v[before:] for c, v in t.items()}, rank=q, step0=before + 1)
                       for q, t in enumerate(traces)))
    return records, nan_step


# -- (4) nothing stale -----------------------------------------------------------------------------------------
def test_a_run_that_ends_cleanly_after_a_divergence_leaves_nothing_firing():
    records, nan_step = diverging_ddp(ranks=2, batch=None)
    p = Pipeline(default_detector_settings())
    fired = [dict(a) for a in p.process(records).alerts]
    assert live(p) and fired[-1]["alert"] == "nan_divergence"
    last = max(r.step or 0 for r in records)  # the job ran on with NaN until its last step, then exited cleanly
    out = p.process([end(0, 1000.0 + last * 0.5 + 1, last), end(1, 1000.0 + last * 0.5 + 1, last)]).alerts
    assert live(p) == []
    assert [(a["alert"], a["state"], a["summary"], a["resolved_by"]) for a in out] == [
        ("nan_divergence", "resolved", f"run ended completed at step {last}", "run_ended")]
    assert [a["alert"] for a in fired if a["state"] == "firing"] == ["grad_explosion", "nan_divergence"]
    assert out[0]["first_rank"] == fired[-1]["first_rank"]  # a run-level incident's resolve still names its root


def test_one_rank_ending_leaves_the_alert_open_and_a_failed_run_says_so():
    p = Pipeline(default_detector_settings())
    p.process([start(0), start(1), *merge(samples(healthy(30), rank=0), samples(healthy(30, seed=1), rank=1))])
    p.process([from_obj({"run": RUN, "rank": 1, "time": 1100.0, "step": 31, "loss": math.nan})])
    assert p.process([end(0, 1101.0, 31)]).alerts == [] and len(live(p)) == 1
    out = p.process([end(1, 1102.0, 31, "failed")]).alerts
    # rank_failed fires for the failed end, and every open alert of the run resolves saying how it ended
    assert [(a["alert"], a["state"]) for a in out] == [
        ("rank_failed", "firing"), ("nan_divergence", "resolved"), ("rank_failed", "resolved")]
    assert {(a["summary"], a["resolved_by"]) for a in out[1:]} == {
        ("run failed at step 31 (rank 1 ended failed)", "run_failed")}
    # the detector still thinks its alert open: its later refreshes do not open it again
    assert p.tick_wall(1200.0) == [] and live(p) == []


@pytest.mark.parametrize("section, records", [
    ("gpu_oom", [from_obj({"type": "oom", "run": RUN, "rank": 3, "time": 1000.0, "step": 812})]),
    ("nan_divergence", [from_obj({"run": RUN, "rank": 0, "time": 1000.0, "step": 5, "loss": math.nan})]),
])
def test_a_detector_disabled_by_a_reload_resolves_its_open_alerts(tmp_path: Path, section, records):
    path = tmp_path / "c.toml"
    path.write_text("")
    sink = SentAlerts()
    sent = sink.sent
    service = Service(load(str(path)), clock=lambda: 1000.0, load_settings=lambda: load(str(path)),
                      alert_sinks=[sink])
    service.accept(service.decoder.decode_body(json.dumps([msgspec_obj(r) for r in records]).encode(),
                                               "application/json", None, max_records=100,
                                               max_decoded_bytes=10**6))
    assert [a["alert"] for a in service.book.firing()] == [section]
    path.write_text(f"[detectors.{section}]\nenabled = false\n")
    assert service.reload() == {"reloaded": True}
    assert service.book.firing() == []
    assert (sent[-1]["state"], sent[-1]["summary"], sent[-1]["resolved_by"]) == (
        "resolved", f"detector {section} disabled by a config reload", "detector_disabled")


def msgspec_obj(rec: Record) -> dict[str, Any]:
    return {k: v for k in rec.__struct_fields__ if (v := getattr(rec, k)) is not None}


# -- (1) one incident per divergence -------------------------------------------------------------------------
def test_lr_raised_20x_at_a_resume_on_8_ddp_ranks_is_two_pages_and_the_nan_names_the_lr_change():
    records, nan_step = diverging_ddp()
    p = Pipeline(default_detector_settings())
    alerts = list(p.process(records).alerts)
    # before: lr_scaling, then loss_spike and grad_explosion on every rank, then nan_divergence (18 pages)
    assert pages(alerts) == [("lr_scaling", "critical"), ("nan_divergence", "critical")]
    lr_alert, nan_alert = (a for a in alerts if a["state"] == "firing")
    # the rise joined lr_scaling's alert (its cause): per-rank detail in its fields
    assert "; since then grad norm grew " in lr_alert["summary"] and lr_alert["spiking_ranks"] == list(range(8))
    assert lr_alert["signals"] == ["loss", "grad norm"] or lr_alert["signals"] == ["grad norm", "loss"]
    assert nan_alert["step"] == nan_step and nan_alert["root_ranks"] == list(range(8))
    # the resume cleared each rank's history: the rise is judged by absolute growth from the first samples
    assert nan_alert["timeline"] == ["LR changed 0.1 -> 2 at step 301 (20x, at a resume)",
                                     "grad norm and loss rose from step 306 (ranks 0-7)"]
    assert lr_alert["judged"] == "early" and lr_alert["onset_step"] == 306
    assert lr_alert["ratio"] == 20.0 and lr_alert["lr"] == 2.0  # the LR's own figures stay its own
    assert nan_alert["summary"].startswith(
        f"loss became nan at step {nan_step} on ranks 0-7 (together: the all-reduced gradients) (before it: LR "
        "changed 0.1 -> 2 at step 301 (20x, at a resume); ")
    assert "restart from the last good checkpoint from before step 301 with the LR it had (0.1)" in nan_alert["summary"]
    assert [a["alert"] for a in live(p)] == ["lr_scaling", "nan_divergence"]


def test_the_same_divergence_without_lr_scaling_is_one_spike_incident_folded_into_the_nan():
    records, nan_step = diverging_ddp(resume=False, batch=None)
    alerts = run_pipeline(records)
    assert [(a["alert"], a["state"], a["rank"]) for a in alerts] == [
        ("grad_explosion", "firing", None), ("grad_explosion", "resolved", None), ("nan_divergence", "firing", None)]
    assert alerts[1]["resolved_by"] == "diverged" and alerts[1]["step"] == nan_step
    assert alerts[1]["summary"].startswith(f"went on to NaN at step {nan_step} (nan_divergence): ")
    assert alerts[2]["timeline"][0] == "LR changed 0.1 -> 2 at step 301 (20x)"


# -- (2) from the first step ----------------------------------------------------------------------------------
def test_adamw_exploding_from_step_1_is_told_before_step_20_and_before_the_nan():
    # HF Trainer with AdamW at a huge LR: loss 6 -> 2.8e5 and grad norm 0.7 -> 1800 in a few steps, no NaN yet
    n = 60
    loss = [6.0 * (1 + 0.05 * (k % 3)) * 40 ** min(k, 5) ** 1.0 / 1 if k < 5 else 2.8e5 for k in range(n)]
    grad = [0.7 * 6 ** min(k, 5) for k in range(n)]
    trace = {"loss": loss, "grad_norm": grad, "lr": [0.5] * n, "grad_scale": [None] * n}
    alerts = run_pipeline([start(0, optimizer="AdamW"), *samples(trace)])
    first = alerts[0]
    assert (first["alert"], first["state"], first["rank"], first["judged"]) == ("loss_spike", "firing", None, "early")
    # a jump inside the first 3 samples (6 -> 252 -> 1e4: 100x the first from step 3) starts it, 3 samples in a row
    assert first["step"] < 20 and first["step"] == 5
    assert first["summary"].startswith("loss grew ")
    assert "within 4 steps of its start: 252 (the median of its first 3 samples, from step 1) -> " in first["summary"]


@pytest.mark.parametrize("kind, trace", [
    ("LoRA: zero-initialized B, grad norm grows 30x in 20 steps", {
        **healthy(200, seed=1), "grad_norm": [0.01 * 30 ** min(k / 20, 1.0) for k in range(200)]}),
    ("loss drops fast from a high start", healthy(200, seed=2, loss0=11.0, tau=5)),
    ("warmup: grad norm 5x over the first steps", healthy(200, seed=3, warmup=20)),
    ("a noisy first batch", {**healthy(200, seed=4), "loss": [0.3] + healthy(200, seed=4)["loss"][1:]}),
])
def test_healthy_first_steps_stay_quiet(kind, trace):
    assert [a for a in run_pipeline(samples(trace)) if a["alert"] in SPIKES] == [], kind


def test_a_tiny_batchs_loss_noisy_from_its_first_step_stays_quiet():
    # the reference trainer's healthy 2- and 4-rank runs (2 samples a rank): a rank's loss moves 10-40x between
    # neighbouring steps from step 1 (2.7 -> 114 -> 30 ...); judged against its first value, 9 of 16 such runs paged
    for seed in range(8):
        ranks = [samples(healthy(60, seed=10 * seed + q, loss0=20.0, tau=30, loss_noise=1.2), rank=q)
                 for q in range(4)]
        assert [a for a in run_pipeline(merge(*ranks)) if a["alert"] in SPIKES] == [], seed


# -- (6) spikes by scale ---------------------------------------------------------------------------------------
def smooth_llm(ranks: int, spike_at: int | None, factor: float) -> list[Record]:
    out = []
    for q in range(ranks):
        t = healthy(600, seed=q, loss0=4.0, loss_floor=2.2, tau=300, loss_noise=0.005)
        if spike_at is not None:
            t["loss"] = [x * (factor if spike_at <= k < spike_at + 6 else 1.0) for k, x in enumerate(t["loss"])]
        out.append(samples(t, rank=q))
    return merge(*out)


def test_a_1_5x_spike_on_a_smooth_llm_loss_on_16_ranks_is_one_soft_warning():
    alerts = [a for a in run_pipeline(smooth_llm(16, 400, 1.5)) if a["alert"] in SPIKES]
    assert [(a["alert"], a["state"], a["rank"], a["severity"]) for a in alerts] == [
        ("loss_spike", "firing", None, "warning"), ("loss_spike", "resolved", None, "warning")]
    fired = alerts[0]
    assert fired["judged"] == "soft" and fired["summary"].startswith("a soft loss spike: ")
    assert alerts[1]["summary"].startswith("loss back to ") and " on every rank" in alerts[1]["summary"]


def test_the_smooth_llm_loss_without_a_spike_and_with_a_1_2x_bump_stays_quiet():
    assert [a for a in run_pipeline(smooth_llm(4, None, 1.0)) if a["alert"] in SPIKES] == []
    assert [a for a in run_pipeline(smooth_llm(4, 400, 1.2)) if a["alert"] in SPIKES] == []


# -- (3) advice that fits --------------------------------------------------------------------------------------
def test_nan_names_lr_scaling_only_when_it_has_an_alert():
    nan = from_obj({"run": RUN, "rank": 0, "time": 1100.0, "step": 60, "loss": math.nan})
    quiet = run_pipeline([start(0, world_size=1, batch_size=16, lr=0.02, reference_lr=0.02,
                                reference_batch_size=16), *samples(healthy(59, peak_lr=0.02)), nan])
    loud = run_pipeline([start(0, world_size=1, batch_size=2, lr=0.02, reference_lr=0.02,
                               reference_batch_size=16), *samples(healthy(59, peak_lr=0.02)), nan])
    assert "lr_scaling" not in quiet[-1]["summary"] and "with a lower LR, and check" in quiet[-1]["summary"]
    assert "with a lower LR (see lr_scaling), and check" in loud[-1]["summary"]


def test_a_collapsing_fp16_scale_is_told_to_fix_the_scaler_not_the_lr():
    trace = with_amp(healthy(200, seed=0), range(100, 200))  # every step overflows from step 101
    (alert,) = [a for a in run_pipeline(samples(trace)) if a["alert"] == "nan_divergence"]
    assert alert["cause"] == "amp_scale_collapse"
    assert "the fix is the fp16 loss scaler, not the LR" in alert["summary"]
    assert "GradScaler" in alert["summary"] and "bf16" in alert["summary"] and "lower LR" not in alert["summary"]


def lr_alert(optimizer: str | None, lr: float, world: int = 8, **settings: Any) -> dict[str, Any]:
    alerts = run_pipeline([start(0, world_size=world, batch_size=32, lr=lr, optimizer=optimizer, warmup_steps=100,
                                 reference_lr=1e-4, reference_batch_size=32)],
                          **({"lr_scaling": settings} if settings else {}))
    return alerts[0] if alerts else {}


def test_adam_family_follows_the_square_root_rule_and_sgd_the_linear_one():
    # 8x the reference batch: Adam's LR x sqrt(8) = 2.83e-4 is right, SGD's x 8 = 8e-4
    assert lr_alert("AdamW", 2.8284e-4) == {} and lr_alert("SGD", 8e-4) == {}
    adam = lr_alert("AdamW", 8e-4)  # the linear rule applied to AdamW: 2.83x the square-root value
    assert adam["rule"] == "sqrt" and adam["expected_lr"] == pytest.approx(2.8284271e-4)
    assert "the square-root-scaling value 0.000282843 for total batch 256" in adam["summary"]
    assert "AdamW: LR x sqrt(batch ratio), Malladi et al. 2022" in adam["summary"]
    assert lr_alert("SGD", 2.8284e-4)["rule"] == "linear"
    assert lr_alert("AdamW", 8e-4, rule="linear") == {}  # configurable: one rule for every optimizer


def test_an_alternative_batch_is_offered_only_within_the_runs_own_range():
    far = lr_alert("SGD", 1e-4 * 166_667 * 8)
    assert "set lr=0.0008" in far["summary"] and "total batch of" not in far["summary"]
    near = lr_alert("SGD", 4e-4)  # 4e-4 fits a total batch of 128, between the reference's 32 and this run's 256
    assert near["summary"].endswith("set lr=0.0008 or a total batch of 128")


def test_a_recovering_signal_says_it_recovered_while_the_other_stays_high():
    n = 600
    t = healthy(n, seed=0)
    t["loss"] = [x * (6 if 400 <= k < 404 else 1) for k, x in enumerate(t["loss"])]
    t["grad_norm"] = [x * (30 if 401 <= k < 440 else 1) for k, x in enumerate(t["grad_norm"])]
    p = Pipeline(default_detector_settings())
    alerts = p.process(samples(t)).alerts
    assert [(a["alert"], a["state"]) for a in alerts] == [("loss_spike", "firing"), ("loss_spike", "resolved")]
    assert alerts[1]["summary"].startswith("loss back to ") and "grad norm back to " in alerts[1]["summary"]
    # while the grad norm was still high, the open alert said the loss had recovered
    p2 = Pipeline(default_detector_settings())
    p2.process(samples({c: v[:420] for c, v in t.items()}))
    (now,) = live(p2)
    assert "; since then loss back to " in now["summary"] and now["signals"] == ["loss", "grad norm"]
    # the status API's findings carry the same per-rank picture
    found = p2.findings(RUN)["loss_spike"]
    assert (found["spiking_ranks"], found["loss_ranks"], found["grad_norm_ranks"]) == ([0], [0], [0])


# -- (5) one text everywhere -----------------------------------------------------------------------------------
def test_the_console_logs_a_refreshed_alerts_new_text(caplog):
    caplog.set_level(logging.INFO, "trainhealth.alerts")
    service = Service(load(), clock=lambda: 5000.0, alert_sinks=[ConsoleLog()])
    body = lambda recs: json.dumps(recs).encode()  # noqa: E731
    base = [{"run": "r", "rank": q, "time": 1000.0 + s, "step": s, "loss": 1.0, "grad_norm": 1.0}
            for s in range(1, 30) for q in (0, 1)]
    service.ingest(body(base), "application/json")
    service.ingest(body([{"run": "r", "rank": 1, "time": 1030.0, "step": 30, "loss": "NaN"}]), "application/json")
    service.ingest(body([{"run": "r", "rank": 0, "time": 1030.1, "step": 30, "loss": "NaN"}]), "application/json")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("ALERT firing critical nan_divergence run=r rank=- step=30: loss became nan at step "
                               "30 on rank 1")
    (alert,) = service.book.firing("r")
    assert lines[-1] == f"ALERT updated critical nan_divergence run=r rank=- step=30: {alert['summary']}"
    assert alert["first_rank"] == 0 and service.stop_steps.view("r")["stops"]["nan_divergence"]["rank"] == 0


def test_a_frozen_rank_that_resumes_stays_the_root_and_the_ranks_behind_it_only_wait():
    # 16 ranks; rank 3 is frozen (SIGSTOP) in step 191, the others block in its all-reduce. Resumed (SIGCONT)
    # at T0+400, rank 3 floods its records (191, 192) at once, ranks 0-1 theirs a moment later, the others
    # 4 s later (their next flush). Before, the refresh in between named "ranks 2, 4-15 are stuck" (the ranks
    # whose records had not come yet) although the webhook had named rank 3.
    from tests import live_traces
    from tests.live_traces import T0, brief, ddp_job, feed

    ranks = range(16)
    job = ddp_job(ranks=16, steps=200, last_step={q: 190 for q in ranks}, silent_at={3: T0 + 101}, until=T0 + 410)
    when = {3: 400.0, 0: 400.2, 1: 400.2}
    later = [from_obj({"type": "heartbeat", "run": live_traces.RUN, "rank": 3, "time": T0 + 399.9, "step": 190})]
    later += [from_obj({"run": live_traces.RUN, "rank": q, "time": T0 + when.get(q, 404.0) + 0.3 * k + 0.001 * q,
                        "step": 190 + k, "loss": 2.0}) for q in ranks for k in (1, 2)]
    alerts = [a for a in feed(sorted(job.records + later, key=lambda r: r.time), until=T0 + 410)
              if a["alert"] == "rank_stalled"]
    assert brief(alerts) == [("rank_stalled", "firing", None, 190), ("rank_stalled", "resolved", None, 190)]
    told = next(a for a in live_traces.last_pipeline.book.history
                if a["alert"] == "rank_stalled" and a["state"] == "firing")  # as refreshed until it resolved
    assert told["root_ranks"] == [3] and told["first_rank"] == 3
    assert told["summary"].startswith("rank 3 went silent after step 190")
    assert "still finish" not in told["summary"] and "are stuck" not in told["summary"]
    assert told["waiting_ranks"] == [q for q in ranks if q != 3] and told["running_ranks"] == []
