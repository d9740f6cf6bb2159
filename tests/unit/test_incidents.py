"""One incident per failure (issue 14): a node down, a crashed rank, NaN through the all-reduce each page
once, naming the root (the first ranks, and their host when they are all of one host's ranks); the ranks
that only wait or only received the NaN are in the alert's fields and in the run's findings.

Traces come from tests/live_traces.py (synthetic DDP jobs: samples per step, heartbeats every 5 s) fed
through the real Pipeline the way the server does (one record per request, a timer tick every second).
"""

from __future__ import annotations

import itertools
import math

import msgspec
import pytest
from trainhealth.config import default_detector_settings
from trainhealth.detectors.helpers.incident import span
from trainhealth.pipeline import Pipeline
from trainhealth.record import Record, from_obj

from tests import live_traces
from tests.live_traces import RUN, T0, brief, ddp_job, feed

STALL, FAILED, NAN = "rank_stalled", "rank_failed", "nan_divergence"
CUDA = {"type": "RuntimeError", "message": "CUDA error: unspecified launch failure\nCUDA kernel errors might be "
        "asynchronously reported", "traceback": 'File "train.py", line 80, in main\n    loss.backward()'}
PEER = {"type": "RuntimeError", "message": "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection "
        "closed by peer [127.0.0.1]:41235", "traceback": "..."}


def with_hosts(records: list[Record], per_host: int) -> list[Record]:
    """Start records carry ``host``: ranks 0..per_host-1 on node-a, the next on node-b, ..."""
    return [msgspec.structs.replace(r, host=f"node-{chr(97 + r.rank // per_host)}") if r.type == "start"
            else r for r in records]


def end(rank: int, t: float, step: int, error: dict | None = None, status: str | None = None) -> Record:
    obj: dict = {"type": "end", "run": RUN, "rank": rank, "time": t, "step": step}
    if error is not None:
        obj.update(status="failed", error=error)
    elif status is not None:
        obj["status"] = status
    return from_obj(obj)


def open_alerts() -> dict[str, dict]:
    """The open alerts after the latest feed(), by name, as they stand now (refreshed in place)."""
    return {a["alert"]: a for a in live_traces.last_pipeline.book.open.values()}


def findings() -> dict:
    return live_traces.last_pipeline.findings(RUN)


def everything(records, until):
    return [a for a in feed(sorted(records, key=lambda r: r.time), until=until)
            if a["alert"] in (STALL, FAILED, NAN)]


# -- a node down ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hosts, per_host, down", [
    (h, p, d) for h in (2, 3, 4) for p in (1, 2, 4, 8) for d in sorted({0, h - 1, h // 2})])
def test_a_host_going_down_is_one_incident_naming_the_host(hosts, per_host, down):
    n = hosts * per_host
    gone = list(range(down * per_host, (down + 1) * per_host))
    job = ddp_job(ranks=n, steps=200, last_step={q: 150 for q in range(n)},
                  silent_at={q: T0 + 85.4 for q in gone}, until=T0 + 500)
    alerts = everything(with_hosts(job.records, per_host), T0 + 500)
    assert brief(alerts) == [(STALL, "firing", None, 150)]  # one page, not one per rank
    a = alerts[0]
    host = f"node-{chr(97 + down)}"
    who = f"rank {gone[0]}" if per_host == 1 else f"ranks {gone[0]}-{gone[-1]}"
    assert a["summary"].startswith(f"{host} went silent: {who} stopped after step 150 at the same moment "
                                   f"(node down or network partition); ")
    others = [q for q in range(n) if q not in gone]
    assert (a["root_ranks"], a["host"], a["first_rank"], a["reason"]) == (gone, host, gone[0], "silent")
    assert a["waiting_ranks"] == others and a["severity"] == "critical"
    assert " wait in a collective;" in a["summary"] or " waits in a collective;" in a["summary"]
    # later the waiting ranks cross their own step limit: the same alert lists them, nobody is paged again
    now = open_alerts()[STALL]
    assert now["stuck_ranks"] == others and now["silent_ranks"] == gone and now["host"] == host
    assert findings()[STALL]["root_ranks"] == gone and findings()[STALL]["waiting_ranks"] == others


def test_the_others_finishing_the_step_the_dead_node_lost_still_wait_in_a_collective():
    # seen on the two-namespace bed: node-b's clients were killed with step 151's samples unsent, while
    # node-a's ranks finished step 151 (its all-reduce had completed) and then wait in step 152's
    job = ddp_job(ranks=4, steps=200, last_step={0: 151, 1: 151, 2: 150, 3: 150},
                  silent_at={2: T0 + 80.3, 3: T0 + 80.3}, until=T0 + 400)
    alerts = everything(with_hosts(job.records, 2), T0 + 400)
    assert brief(alerts) == [(STALL, "firing", None, 150)]
    summary = alerts[0]["summary"]
    assert summary.startswith("node-b went silent: ranks 2-3 stopped after step 150 at the same moment (node down "
                              "or network partition); ranks 0-1 on node-a wait in a collective;"), summary
    assert alerts[0]["waiting_ranks"] == [0, 1]


def test_ranks_that_keep_finishing_steps_after_one_went_silent_are_said_to_train_on():
    # not synchronous with it (or a rank of another group): the others' steps keep coming
    job = ddp_job(ranks=4, steps=600, silent_at={3: T0 + 85.4}, until=T0 + 400)
    alerts = everything(with_hosts(job.records, 2), T0 + 400)
    assert brief(alerts)[0][:3] == (STALL, "firing", None)
    assert "; ranks 0-2 still finish steps;" in alerts[0]["summary"] or \
        "; ranks 0-1 on node-a, 2 on node-b still finish steps;" in alerts[0]["summary"], alerts[0]["summary"]


def test_a_survivor_stopped_by_its_launcher_after_its_neighbour_failed_is_not_a_root():
    # the flaky e2e (host None): node-b is SIGKILLed; rank 0 fails with a collective error and exits, and
    # torchrun's agent on node-a SIGTERMs rank 1 before its own error was reported: rank 1 goes silent too
    job = ddp_job(ranks=4, steps=200, last_step={q: 150 for q in range(4)},
                  silent_at={0: T0 + 85.4, 1: T0 + 85.7, 2: T0 + 85.4, 3: T0 + 85.4}, until=T0 + 400)
    crash = [end(0, T0 + 85.6, 150, PEER)]
    alerts = everything(with_hosts(job.records, 2) + crash, T0 + 400)
    assert brief(alerts) == [(STALL, "firing", None, 150)]
    a = open_alerts()[STALL]
    assert (a["host"], a["root_ranks"], a["failed_ranks"], a["stopped_ranks"], a["waiting_ranks"]) == \
        ("node-b", [2, 3], [0], [1], [])
    assert a["summary"].startswith("node-b went silent: ranks 2-3 stopped after step 150 at the same moment (node "
                                   "down or network partition); rank 0 on node-a failed after them with a "
                                   "collective error (RuntimeError: "), a["summary"]
    assert "; rank 1 on node-a went silent after it (stopped by its launcher when a rank of its node failed);" \
        in a["summary"]


def test_a_silent_rank_beside_a_failed_one_with_no_other_host_quiet_is_still_named():
    # rank 1 quiet on its own while rank 0 of the same host failed with a collective error: nobody else went
    # quiet, so rank 1 is the root (it is not torn down after another host's silence)
    job = ddp_job(ranks=4, steps=200, last_step={q: 150 for q in range(4)}, silent_at={1: T0 + 85.4},
                  until=T0 + 400)
    crash = [end(0, T0 + 85.6, 150, PEER)]
    alerts = everything(with_hosts(job.records, 2) + crash, T0 + 400)
    a = open_alerts()[STALL]
    assert (a["root_ranks"], a["stopped_ranks"]) == ([1], []), alerts


def test_without_hosts_a_silent_rank_beside_a_failed_one_stays_a_root():
    # an older client (no host in its start): who was stopped by a launcher cannot be told, nothing is dropped
    job = ddp_job(ranks=4, steps=200, last_step={q: 150 for q in range(4)},
                  silent_at={0: T0 + 85.4, 1: T0 + 85.7, 2: T0 + 85.4, 3: T0 + 85.4}, until=T0 + 400)
    everything(job.records + [end(0, T0 + 85.6, 150, PEER)], T0 + 400)
    a = open_alerts()[STALL]
    assert (a["root_ranks"], a["stopped_ranks"], a["failed_ranks"], a["host"]) == ([1, 2, 3], [], [0], None)


def test_the_field_case_two_machines_of_four_ranks_one_down():
    job = ddp_job(ranks=8, steps=1600, step_seconds=0.2, last_step={q: 1500 for q in range(8)},
                  silent_at={q: T0 + 305.3 for q in range(4, 8)}, until=T0 + 700)
    alerts = everything(with_hosts(job.records, 4), T0 + 700)
    assert brief(alerts) == [(STALL, "firing", None, 1500)]
    assert alerts[0]["summary"].startswith(
        "node-b went silent: ranks 4-7 stopped after step 1500 at the same moment (node down or network "
        "partition); ranks 0-3 on node-a wait in a collective; limit 60 s")


def test_two_hosts_of_four_down_name_both():
    job = ddp_job(ranks=8, steps=200, last_step={q: 150 for q in range(8)},
                  silent_at={q: T0 + 85.4 for q in (2, 3, 4, 5)}, until=T0 + 400)
    alerts = everything(with_hosts(job.records, 2), T0 + 400)
    assert brief(alerts) == [(STALL, "firing", None, 150)]
    assert alerts[0]["summary"].startswith("node-b and node-c went silent: ranks 2-5 stopped after step 150")
    assert (alerts[0]["hosts"], alerts[0]["host"]) == (["node-b", "node-c"], None)


def test_part_of_a_host_going_silent_names_the_ranks_not_the_host():
    job = ddp_job(ranks=8, steps=200, last_step={q: 150 for q in range(8)},
                  silent_at={q: T0 + 85.4 for q in (5, 6)}, until=T0 + 400)
    alerts = everything(with_hosts(job.records, 4), T0 + 400)
    assert alerts[0]["summary"].startswith("ranks 5-6 went silent after step 150 at the same moment (processes "
                                           "gone or frozen")
    assert alerts[0]["host"] is None and alerts[0]["root_ranks"] == [5, 6]


def test_ranks_without_host_are_named_by_rank():
    job = ddp_job(ranks=8, steps=200, last_step={q: 150 for q in range(8)},
                  silent_at={q: T0 + 85.4 for q in range(4, 8)}, until=T0 + 400)
    alerts = everything(job.records, T0 + 400)  # an older client: no host in its start records
    assert brief(alerts) == [(STALL, "firing", None, 150)]
    assert alerts[0]["summary"].startswith("ranks 4-7 went silent after step 150 at the same moment")
    assert "ranks 0-3 wait in a collective" in alerts[0]["summary"]


def test_node_down_whose_survivors_crash_with_collective_errors_is_still_the_silent_node():
    # on one machine (or with TCP resets) the survivors' collectives fail at once: "Connection closed by
    # peer". They are consequences: the incident is node-b's silence, and rank_failed stays quiet
    job = ddp_job(ranks=4, steps=200, last_step={q: 150 for q in range(4)}, silent_at={q: T0 + 85.4 for q in range(4)},
                  until=T0 + 85.4)
    crashes = [end(q, T0 + 85.6 + 0.01 * q, 150, PEER) for q in (0, 1)]
    alerts = everything(with_hosts(job.records, 2) + crashes, T0 + 400)
    assert brief(alerts) == [(STALL, "firing", None, 150)]
    a = alerts[0]
    assert a["summary"].startswith("node-b went silent: ranks 2-3 stopped after step 150 at the same moment")
    assert "ranks 0-1 on node-a failed after them with a collective error (RuntimeError: [../third_party/gloo" \
        in a["summary"]
    assert (a["root_ranks"], a["failed_ranks"], a["waiting_ranks"]) == ([2, 3], [0, 1], [])


def test_every_rank_seen_ending_with_a_collective_error_is_one_rank_failed():
    # a sidecar per node: node-a's sidecar sees only its own ranks, which failed when node-b vanished
    job = ddp_job(ranks=2, steps=200, last_step={0: 150, 1: 150}, until=T0 + 85.4)
    crashes = [end(1, T0 + 85.6, 150, PEER), end(0, T0 + 85.6, 150, PEER)]
    alerts = everything(job.records + crashes, T0 + 400)
    # every rank has ended: the run's alert resolves saying how (nothing stale stays firing)
    assert brief(alerts) == [(FAILED, "firing", None, 150), (FAILED, "resolved", None, 150)]
    assert (alerts[1]["summary"], alerts[1]["resolved_by"]) == ("run failed at step 150 (ranks 0-1 ended failed)",
                                                                "run_failed")
    assert alerts[0]["first_rank"] == 0  # same time: the lowest rank
    assert "every rank of the run ended, each with a collective error: the rank that broke the collective " \
           "is not among those this sidecar sees" in alerts[0]["summary"]


# -- a crashed rank ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("ranks, failing", [(2, 1), (2, 0), (4, 3), (8, 5), (8, 0)])
def test_a_crashed_rank_is_one_rank_failed_quoting_it_and_the_others_never_page_as_stalled(ranks, failing):
    job = ddp_job(ranks=ranks, steps=100, last_step={q: 20 for q in range(ranks)},
                  silent_at={failing: T0 + 15.2}, until=T0 + 1200)
    crash = end(failing, T0 + 15.1, 20, CUDA)
    alerts = everything(job.records + [crash], T0 + 1200)
    assert brief(alerts) == [(FAILED, "firing", None, 20)]
    a = alerts[0]
    others = [q for q in range(ranks) if q != failing]
    who = f"rank {others[0]} waits" if len(others) == 1 else f"ranks {span(others)} wait"
    assert a["summary"] == (f"rank {failing} failed at step 20: RuntimeError: CUDA error: unspecified launch "
                            f"failure; {who} in a collective")
    assert (a["first_rank"], a["failed_ranks"], a["waiting_ranks"]) == (failing, [failing], others)
    assert (a["error_type"], a["traceback"]) == ("RuntimeError", CUDA["traceback"])
    assert a["time"] == T0 + 15.1 and a["severity"] == "critical"
    assert findings()[FAILED]["waiting_ranks"] == others and STALL not in findings()


def test_the_others_waiting_in_the_step_phase_wait_in_the_all_reduce():
    recs = [from_obj({"type": "start", "run": RUN, "rank": q, "time": T0, "world_size": 2}) for q in (0, 1)]
    recs += [from_obj({"run": RUN, "rank": q, "time": T0 + s + 0.001 * q, "step": s, "loss": 1.0})
             for s in range(1, 21) for q in (0, 1)]
    recs.append(from_obj({"type": "heartbeat", "run": RUN, "rank": 0, "time": T0 + 21.2, "step": 20, "phase": "step",
                          "phase_time": T0 + 21.0}))
    recs.append(end(1, T0 + 21.3, 20, CUDA))
    alerts = everything(recs, T0 + 1000)
    assert [a["summary"] for a in alerts] == ["rank 1 failed at step 20: RuntimeError: CUDA error: unspecified "
                                              "launch failure; rank 0 waits in the all-reduce"]


def test_the_others_crashing_after_it_with_collective_errors_fold_into_the_same_alert():
    job = ddp_job(ranks=4, steps=100, last_step={q: 20 for q in range(4)}, silent_at={q: T0 + 15.2 for q in range(4)},
                  until=T0 + 15.2)
    crashes = [end(2, T0 + 15.1, 20, CUDA)] + [end(q, T0 + 15.15, 20, PEER) for q in (0, 1, 3)]
    alerts = everything(job.records + crashes, T0 + 600)
    assert brief(alerts) == [(FAILED, "firing", None, 20), (FAILED, "resolved", None, 20)]  # every rank ended
    assert alerts[1]["summary"] == "run failed at step 20 (ranks 0-3 ended failed)"
    # the firing transition as the book holds it: refreshed in place while it was open
    now = next(a for a in live_traces.last_pipeline.book.history if a["state"] == "firing")
    assert (now["first_rank"], now["failed_ranks"], now["waiting_ranks"]) == (2, [0, 1, 2, 3], [])
    assert now["summary"].startswith("rank 2 failed at step 20: RuntimeError: CUDA error: unspecified launch "
                                     "failure; ranks 0-1, 3 failed after it with a collective error")


def test_a_consequence_arriving_first_does_not_take_the_root():
    # rank 0's collective error reaches the sidecar before rank 1's own crash (another batch)
    job = ddp_job(ranks=2, steps=100, last_step={0: 20, 1: 20}, until=T0 + 15.2)
    alerts = everything(job.records + [end(0, T0 + 15.15, 20, PEER), end(1, T0 + 15.3, 20, CUDA)], T0 + 300)
    assert brief(alerts) == [(FAILED, "firing", None, 20), (FAILED, "resolved", None, 20)]
    assert alerts[0]["first_rank"] == 1 and alerts[0]["failed_ranks"] == [0, 1]


def test_a_gpu_oom_crash_with_its_oom_record_is_gpu_oom_alone():
    job = ddp_job(ranks=2, steps=100, last_step={0: 20, 1: 20}, silent_at={1: T0 + 15.2}, until=T0 + 800)
    oom = from_obj({"type": "oom", "run": RUN, "rank": 1, "time": T0 + 15.05, "step": 20,
                    "message": "CUDA out of memory. Tried to allocate 2.00 GiB"})
    crash = end(1, T0 + 15.1, 20, {"type": "torch.OutOfMemoryError", "message": "CUDA out of memory. Tried to "
                                   "allocate 2.00 GiB", "traceback": "..."})
    alerts = [a for a in feed(sorted(job.records + [oom, crash], key=lambda r: r.time), until=T0 + 800)]
    assert brief(alerts) == [("gpu_oom", "firing", 1, 20)]  # not rank_failed, not rank_stalled


def test_an_oom_crash_without_an_oom_record_is_rank_failed():
    job = ddp_job(ranks=2, steps=100, last_step={0: 20, 1: 20}, silent_at={1: T0 + 15.2}, until=T0 + 300)
    crash = end(1, T0 + 15.1, 20, {"type": "torch.OutOfMemoryError", "message": "CUDA out of memory",
                                   "traceback": "..."})
    alerts = everything(job.records + [crash], T0 + 300)
    assert brief(alerts) == [(FAILED, "firing", None, 20)]


def test_a_rank_killed_by_a_signal_stays_silence_named_by_the_stall_detector():
    job = ddp_job(ranks=4, steps=100, last_step={q: 20 for q in range(4)}, silent_at={2: T0 + 15.2}, until=T0 + 300)
    alerts = everything(job.records, T0 + 300)
    assert brief(alerts) == [(STALL, "firing", None, 20)]
    assert alerts[0]["summary"].startswith("rank 2 went silent after step 20: nothing from it for 60 s")


def test_a_restart_after_the_crash_resolves_it():
    job = ddp_job(ranks=2, steps=100, last_step={0: 20, 1: 20}, silent_at={1: T0 + 15.2}, until=T0 + 40)
    again = ddp_job(ranks=2, steps=60, first_step=21, t0=T0 + 50)
    alerts = everything(job.records + [end(1, T0 + 15.1, 20, CUDA)] + again.records, again.t(60))
    assert brief(alerts) == [(FAILED, "firing", None, 20), (FAILED, "resolved", None, 20)]
    assert alerts[1]["summary"] == "run restarted (start from rank 1) after the failure"
    assert findings() == {}


# -- healthy ends -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("status", [None, "completed"])
def test_clean_ends_at_different_times_never_alert(status):
    # each rank ends when it is done, minutes apart (an uneven last epoch, a slow checkpoint upload),
    # its heartbeat thread beating on for a while after `end`
    job = ddp_job(ranks=8, steps=300, pauses={101: 60.0, 201: 60.0}, until=T0 + 420)
    ends = [end(q, job.t(300) + 1 + 40 * q, 300, status=status) for q in range(8)]
    alerts = feed(sorted(with_hosts(job.records, 4) + ends, key=lambda r: r.time), until=T0 + 3000)
    assert alerts == []


def test_a_clean_end_of_one_rank_while_the_others_train_on_never_alerts():
    job = ddp_job(ranks=4, steps=300, until=T0 + 160)
    ends = [end(q, job.t(300) + 0.5 + 30 * q, 300, status="completed") for q in range(4)]
    assert feed(sorted(job.records + ends, key=lambda r: r.time), until=T0 + 2000) == []


def test_elastic_restart_on_fewer_hosts_stays_quiet():
    before = ddp_job(ranks=8, steps=100, until=T0 + 55)
    after = ddp_job(ranks=4, steps=400, first_step=101, t0=T0 + 60, world_size=4)
    records = with_hosts(before.records, 4) + with_hosts(after.records, 4)
    assert everything(records, after.t(400)) == []  # (lr_scaling has its say on the smaller batch)


def test_slow_steps_and_checkpoint_pauses_with_hosts_stay_quiet():
    job = ddp_job(ranks=8, steps=40, step_seconds=lambda k: 60.0 if k % 10 else 150.0, pauses={20: 120.0})
    assert feed(with_hosts(job.records, 4), until=job.t(40)) == []


# -- NaN advice that fits the run -------------------------------------------------------------------------
def sample(rank: int, step: int, t: float, loss: float, grad: float) -> Record:
    return from_obj({"run": RUN, "rank": rank, "time": t, "step": step, "loss": loss, "grad_norm": grad})


def independent(nan_at: dict[int, int], ranks: int = 2, steps: int = 40, gap: float = 1e-6) -> list[Record]:
    """Ranks that do not share gradients (each its own grad norm); rank -> step where its own loss is NaN.
    Within a step the highest rank's record has the earliest time (microseconds apart)."""
    out = []
    for s in range(1, steps + 1):
        for q in range(ranks):
            if s > nan_at.get(q, math.inf):
                continue  # terminal: what comes after does not matter
            loss = math.nan if s == nan_at.get(q) else 2.0 - 0.01 * s
            out.append(sample(q, s, T0 + s + (ranks - q) * gap, loss, 1.0 + 0.1 * q + 0.001 * s))
    return sorted(out, key=lambda r: r.time)


def shared(root: int, at: int, ranks: int, steps: int = 40) -> list[Record]:
    """DDP: every rank reports the same all-reduced grad norm; rank ``root``'s batch makes its loss NaN at
    ``at``, every grad norm is NaN there, and every loss from the next step on."""
    out = []
    for s in range(1, steps + 1):
        for q in range(ranks):
            loss = math.nan if (s == at and q == root) or s > at else 2.0 - 0.01 * s
            grad = math.nan if s >= at else 1.0 + 0.001 * s
            out.append(sample(q, s, T0 + s + 0.001 * q, loss, grad))
    return out


def nan_picture(records: list[Record], batch: int = 1) -> tuple[list[dict], dict, dict]:
    """(transitions as made, the open alert now, findings), fed ``batch`` records at a time."""
    p = Pipeline(default_detector_settings())
    made = []
    for i in range(0, len(records), batch):
        made += [dict(a) for a in p.process(records[i:i + batch]).alerts if a["alert"] == NAN]
    made += [dict(a) for a in p.tick_wall(10.0) if a["alert"] == NAN]  # a second later: the sharpened picture
    (now,) = [a for a in p.book.open.values() if a["alert"] == NAN]
    return made, now, p.findings(RUN)[NAN]


def test_the_field_case_own_nan_on_both_ranks_microseconds_apart_keeps_the_lr_advice():
    # 2 ranks that do not share gradients; both losses turn NaN at step 20, rank 1's record 1 us earlier
    made, now, facts = nan_picture(independent({0: 20, 1: 20}))
    assert len(made) == 1 and now["first_rank"] == 0  # the lowest rank, never the earlier microsecond
    assert now["summary"] == ("loss became nan at step 20 on ranks 0-1 (each on its own); restart from the last "
                              "good checkpoint with a lower LR, and check their batch at that "
                              "step")
    assert (facts["root_ranks"], facts["own_loss_ranks"], facts["received_ranks"]) == ([0, 1], [0, 1], [])
    assert "check rank 0's batch" not in now["summary"]


def test_the_field_case_rank_1_own_nan_alone_is_told_so():
    made, now, facts = nan_picture(independent({1: 20}))
    assert now["summary"].startswith("loss became nan at step 20 on rank 1 (its own loss); restart from the last "
                                     "good checkpoint with a lower LR")
    assert now["shared_gradients"] is False and facts["first_rank"] == 1


def test_a_later_own_nan_on_ranks_that_do_not_share_gradients_keeps_the_lr_advice():
    made, now, facts = nan_picture(independent({1: 20, 0: 30}, steps=40))
    assert len(made) == 1 and now["first_rank"] == 1
    assert now["summary"].endswith("; the own loss of rank 0 became non-finite too (step 30): the same advice "
                                   "holds")
    assert "check rank 1's batch, not theirs" not in now["summary"]
    assert (facts["own_loss_ranks"], facts["received_ranks"]) == ([0, 1], [])


@pytest.mark.parametrize("ranks, root", [(2, 1), (4, 0), (4, 3), (8, 5)])
def test_nan_through_the_all_reduce_points_the_others_at_the_root_batch(ranks, root):
    made, now, facts = nan_picture(shared(root, 12, ranks))
    assert [(a["state"], a["rank"]) for a in made] == [("firing", None)]
    others = [q for q in range(ranks) if q != root]
    assert (now["first_rank"], now["root_ranks"], now["received_ranks"]) == (root, [root], others)
    assert now["shared_gradients"] is True and now["cause"] == "nonfinite_loss"
    assert now["summary"].startswith(f"loss became nan at step 12 on rank {root} (its own loss); restart from the "
                                     f"last good checkpoint with a lower LR, and check its batch")
    assert now["summary"].endswith(f"got the NaN only through the shared gradients: check rank {root}'s batch, "
                                   f"not theirs")


def test_nan_on_another_node_names_the_root_with_its_host():
    # two nodes of two ranks (start records carry host): bad data on rank 2 of node-b
    starts = [from_obj({"type": "start", "run": RUN, "rank": q, "time": T0 - 1, "world_size": 4,
                        "host": f"node-{chr(97 + q // 2)}"}) for q in range(4)]
    made, now, facts = nan_picture(starts + shared(2, 12, 4))
    assert now["summary"].startswith("loss became nan at step 12 on rank 2 on node-b (its own loss); "), now["summary"]
    assert (now["first_rank"], now["root_hosts"], now["received_ranks"]) == (2, ["node-b"], [0, 1, 3])


def test_ties_lowest_step_then_own_loss_then_lowest_rank():
    grad7 = [sample(0, 7, T0 + 7, 1.0, math.inf)]
    loss8 = [sample(1, 8, T0 + 7.5, math.nan, 1.0)]
    assert nan_picture(loss8 + grad7)[1]["first_rank"] == 0  # the lower step wins, whatever the arrival
    grad8 = [sample(0, 8, T0 + 8.0, 1.0, math.nan)]
    loss8_late = [sample(3, 8, T0 + 8.9, math.nan, math.nan)]
    assert nan_picture(grad8 + loss8_late)[1]["first_rank"] == 3  # own loss beats grad-only at one step
    both = [sample(2, 8, T0 + 8.000002, math.nan, 1.0), sample(1, 8, T0 + 8.000001, math.nan, 2.0)]
    assert nan_picture(both)[1]["first_rank"] == 1  # then the lowest rank


def test_server_and_replay_agree_on_the_root_whatever_the_arrival_order():
    records = shared(2, 12, 4)
    at12 = [r for r in records if r.step == 12]
    rest = [r for r in records if r.step != 12 and r.step < 12]
    pictures = set()
    for order in itertools.permutations(at12):
        for batch in (1, 3, 100):
            _, now, facts = nan_picture(rest + list(order), batch=batch)
            pictures.add((now["first_rank"], now["summary"], tuple(facts["received_ranks"])))
    assert len(pictures) == 1 and next(iter(pictures))[0] == 2


# -- the client's host ------------------------------------------------------------------------------------
def test_client_host_comes_from_trainhealth_host_else_the_machine():
    import socket

    from trainhealth.trainer.client import Telemetry
    from trainhealth.trainer.settings import from_environ

    from .trainer_fakes import Clock, FakeSender

    assert from_environ({"TRAINHEALTH_HOST": "node-b"}).host == "node-b"
    assert from_environ({}).host == socket.gethostname()
    sink, clock = FakeSender(), Clock()
    tm = Telemetry(environ={"TRAINHEALTH_HOST": "node-b", "RANK": "4", "WORLD_SIZE": "8"}, sink=sink, probes=[],
                   start_threads=False, clock=clock, monotonic=clock)
    tm.start(batch_size=2, lr=0.1)
    tm.pump()
    (rec,) = sink.records
    assert (rec["type"], rec["rank"], rec["host"]) == ("start", 4, "node-b")


# -- settings ---------------------------------------------------------------------------------------------
def test_rank_failed_is_registered_with_its_config_section():
    from trainhealth.config import ConfigError, detector_settings
    from trainhealth.detectors.rank_failed import RankFailedSettings

    assert default_detector_settings()["rank_failed"] == RankFailedSettings(enabled=True)
    assert detector_settings({"rank_failed": {"enabled": False}})["rank_failed"].enabled is False
    with pytest.raises(ValueError, match="rank_failed.enabled: must be true or false, got 1"):
        detector_settings({"rank_failed": {"enabled": 1}})
    with pytest.raises(ConfigError, match="detectors.rank_failed.enabld: unknown setting"):
        detector_settings({"rank_failed": {"enabld": True}})


def test_disabled_rank_failed_is_silent():
    from tests.live_traces import settings

    job = ddp_job(ranks=2, steps=100, last_step={0: 20, 1: 20}, silent_at={1: T0 + 15.2}, until=T0 + 300)
    records = sorted(job.records + [end(1, T0 + 15.1, 20, CUDA)], key=lambda r: r.time)
    assert feed(records, until=T0 + 300, only=FAILED,
                detector_settings=settings(rank_failed={"enabled": False})) == []


@pytest.mark.parametrize("error, peer", [
    (PEER, True),
    ({"type": "RuntimeError", "message": "[../third_party/gloo/gloo/transport/tcp/pair.cc:598] Connection reset "
      "by peer [127.0.0.1]:5"}, True),
    ({"type": "torch.distributed.DistBackendError", "message": "NCCL communicator was aborted on rank 3"}, True),
    ({"type": "RuntimeError", "message": "[Rank 0] Watchdog caught collective operation timeout: "
      "WorkNCCL(SeqNum=12, OpType=ALLREDUCE) ran for 600000 milliseconds before timing out."}, True),
    ({"type": "DistNetworkError", "message": "failed to recv, got 0 bytes"}, True),
    (CUDA, False),
    ({"type": "ValueError", "message": "Target size (torch.Size([8])) must be the same as input size"}, False),
    ({"type": "RuntimeError", "message": "DataLoader worker (pid 123) is killed by signal: Killed."}, False),
    ({"type": "torch.OutOfMemoryError", "message": "CUDA out of memory. Tried to allocate 2.00 GiB"}, False),
])
def test_collective_errors_are_told_from_a_ranks_own(error, peer):
    from trainhealth.detectors.helpers.incident import peer_error
    from trainhealth.record import ErrorInfo

    assert peer_error(ErrorInfo(type=error["type"], message=error["message"])) is peer


def test_a_whole_large_job_going_nan_builds_few_pictures_not_one_per_rank(monkeypatch):
    # 2048 ranks all-reduce a NaN at once: the picture (O(ranks)) is rebuilt when the root changes and
    # once per tick, not for every rank's record (that was O(ranks^2) per batch). Counted, not timed.
    from trainhealth.config import Limits
    from trainhealth.detectors.nan_divergence import NanDivergence

    n = 2048
    calls = 0
    real = NanDivergence._picture

    def counted(self):
        nonlocal calls
        calls += 1
        return real(self)

    monkeypatch.setattr(NanDivergence, "_picture", counted)
    p = Pipeline(default_detector_settings(), Limits(max_ranks_per_run=n))
    order = list(range(n))
    import random

    random.Random(1).shuffle(order)
    p.process([sample(q, 1, T0 + 1, 1.0, 1.0) for q in order])
    out = p.process([sample(q, 2, T0 + 2, 1.0, math.nan) for q in order]).alerts
    assert [a["alert"] for a in out] == [NAN]
    assert calls <= 30  # ~ln(2048) new lowest ranks, plus a tick
    p.tick_wall(10.0)
    (now,) = p.book.open.values()
    assert now["diverged_ranks"] == n and now["first_rank"] == 0 and len(now["root_ranks"]) == n


def test_records_measured_before_a_crash_arriving_after_its_end_do_not_revive_the_rank():
    # the crash report is sent at once; the client's buffered samples of the last steps follow it
    job = ddp_job(ranks=4, steps=200, last_step={q: 150 for q in range(4)},
                  silent_at={q: T0 + 85.4 for q in range(4)}, until=T0 + 85.4)
    records = sorted(with_hosts(job.records, 2), key=lambda r: r.time)
    late = [r for r in records if r.rank in (0, 1) and r.time > T0 + 84.0]  # still in node-a's buffers
    early = [r for r in records if r not in late]
    crashes = [end(q, T0 + 85.6, 150, PEER) for q in (0, 1)]
    alerts = [a for a in feed(early + crashes + late, until=T0 + 400) if a["alert"] in (STALL, FAILED)]
    assert brief(alerts) == [(STALL, "firing", None, 150)]
    assert alerts[0]["summary"].startswith("node-b went silent: ranks 2-3 stopped after step 150 at the same "
                                           "moment (node down or network partition); ranks 0-1 on node-a failed "
                                           "after them with a collective error")


def test_an_all_reduced_gradient_overflow_on_every_rank_is_said_to_be_one_not_each_on_its_own():
    # DDP (equal grad norms), the LR too high: every rank's grad norm turns inf at step 15 with finite losses
    records = [sample(q, s, T0 + s + 0.001 * q, 2.0 - 0.01 * s, math.inf if s >= 15 else 1.0 + 0.001 * s)
               for s in range(1, 20) for q in range(4)]
    _, now, _ = nan_picture(records)
    assert now["shared_gradients"] is True and now["cause"] == "nonfinite_grad_norm"
    assert "on ranks 0-3 (together: the all-reduced gradients)" in now["summary"]
    assert "each on its own" not in now["summary"]
