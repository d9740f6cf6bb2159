"""Deaths named with their cause (issue 21), over traces through the real Pipeline: the launcher's ``end``
(signal, exit code, stderr tail, OOM kill), merged with the client's own report; a rank quiet since
before a peer's collective error named within seconds; the healthy look-alikes that must stay quiet
(a rank blocked in a collective that still heartbeats; an exit code chosen after a clean end).
The launcher's pure parts (its record, its stderr tail) and the cgroup readers are tested here too."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from trainhealth.detectors.helpers.incident import death, last_words
from trainhealth.record import ErrorInfo, RecordError, from_obj
from trainhealth.trainer import host_memory
from trainhealth.trainer.launch import Tail, end_record
from trainhealth.trainer.settings import ClientSettings

from tests import live_traces
from tests.live_traces import RUN, T0, brief, ddp_job, feed

STALL, FAILED = "rank_stalled", "rank_failed"
WATCHDOG = ("[rank1]:[E ProcessGroupNCCL.cpp:563] [Rank 1] Watchdog caught collective operation timeout: "
            "WorkNCCL(SeqNum=9, OpType=ALLREDUCE) ran for 600045 milliseconds before timing out.\n"
            "terminate called after throwing an instance of 'c10::DistBackendError'\n"
            "  what():  [PG 0 Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=9, "
            "OpType=ALLREDUCE) ran for 600045 milliseconds before timing out.\n"
            "Exception raised from checkTimeout at ../torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:565\n")
SEGV = ("Fatal Python error: Segmentation fault\n\nThread 0x00007f3a (most recent call first):\n"
        '  File "/usr/lib/python3.11/threading.py", line 324 in wait\n\n'
        "Current thread 0x00007f3b (most recent call first):\n"
        '  File "/usr/lib/python3.11/ctypes/__init__.py", line 519 in string_at\n'
        '  File "/job/train.py", line 66 in main\n\nExtension modules: psutil._psutil_linux (total: 1)\n')
PEER = {"type": "RuntimeError", "message": "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection "
        "closed by peer [127.0.0.1]:41235", "traceback": "..."}
CUDA = {"type": "RuntimeError", "message": "CUDA error: unspecified launch failure", "traceback": "..."}


def end(rank: int, t: float, step: int | None = None, **fields) -> object:
    obj: dict = {"type": "end", "run": RUN, "rank": rank, "time": t, "status": "failed", **fields}
    if step is not None:
        obj["step"] = step
    return from_obj(obj)


def open_alerts() -> dict[str, dict]:
    return {a["alert"]: a for a in live_traces.last_pipeline.book.open.values()}


def everything(records, until):
    return [a for a in feed(sorted(records, key=lambda r: r.time), until=until) if a["alert"] in (STALL, FAILED)]


# -- the launcher's word ----------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, cause, words", [
    ({"signal": "SIGKILL"}, "signal",
     "killed by SIGKILL (cannot be caught: the OOM killer, the scheduler or a user)"),
    ({"signal": "SIGSEGV", "stderr_tail": SEGV}, "signal",
     'killed by SIGSEGV (segmentation fault): Fatal Python error: Segmentation fault (File '
     '"/usr/lib/python3.11/ctypes/__init__.py", line 519 in string_at)'),
    ({"exit_code": 13}, "exit", "exited with code 13 without reporting an exception"),
    ({"signal": "SIGKILL", "oom_killed": True, "host_mem_bytes": 3.5 * 2**30, "host_mem_limit_bytes": 4 * 2**30},
     "oom_killer", "killed by the kernel's OOM killer at 3.5 GiB of its 4.0 GiB limit (SIGKILL)"),
])
def test_a_death_the_launcher_saw_is_one_rank_failed_saying_how(fields, cause, words):
    job = ddp_job(ranks=2, steps=100, last_step={0: 20, 1: 20}, silent_at={1: T0 + 15.2}, until=T0 + 300)
    alerts = everything(job.records + [end(1, T0 + 15.25, **fields)], T0 + 300)
    assert brief(alerts) == [(FAILED, "firing", None, 20)]  # its step: the rank's last (the launcher knows none)
    a = alerts[0]
    assert a["summary"] == f"rank 1 died at step 20: {words}; rank 0 waits in a collective"
    assert (a["cause"], a["signal"], a["exit_code"]) == (cause, fields.get("signal"), fields.get("exit_code"))
    assert a["time"] == T0 + 15.25 and a["first_rank"] == 1 and a["oom_killed"] is bool(fields.get("oom_killed"))


def test_the_launchers_word_after_the_clients_exception_refreshes_the_same_incident():
    job = ddp_job(ranks=2, steps=100, last_step={0: 20, 1: 20}, silent_at={1: T0 + 15.2}, until=T0 + 300)
    tail = "Traceback (most recent call last):\n  ...\nRuntimeError: CUDA error: unspecified launch failure\n"
    alerts = everything(job.records + [end(1, T0 + 15.1, 20, error=CUDA),
                                       end(1, T0 + 15.3, exit_code=1, stderr_tail=tail)], T0 + 300)
    assert brief(alerts) == [(FAILED, "firing", None, 20)]
    now = open_alerts()[FAILED]
    assert now["summary"].startswith("rank 1 failed at step 20: RuntimeError: CUDA error: unspecified launch")
    assert (now["cause"], now["exit_code"], now["stderr_tail"], now["error_type"]) == ("exception", 1, tail,
                                                                                     "RuntimeError")


def test_an_exit_code_chosen_after_a_clean_end_is_no_failure():
    # the documented stop (stop_on): tm.end(), then exit 3; the launcher reports the exit code
    job = ddp_job(ranks=2, steps=40, end=True)
    launcher = [end(q, job.t(40) + 0.6 + 0.01 * q, exit_code=3) for q in (0, 1)]
    assert everything(job.records + launcher, job.t(40) + 300) == []
    assert {r.end_status for r in live_traces.last_pipeline.runs[RUN].ranks.values()} == {None}  # clean, as sent


def test_ranks_stopped_by_their_launcher_after_a_death_are_its_consequence():
    # rank 2 segfaults; torchrun stops ranks 0-1 (their launchers pass SIGTERM on); rank 3 is still to go
    job = ddp_job(ranks=4, steps=100, last_step={q: 20 for q in range(4)}, silent_at={q: T0 + 15.2 for q in range(4)},
                  until=T0 + 15.2)
    deaths = [end(2, T0 + 15.25, signal="SIGSEGV", stderr_tail=SEGV)]
    deaths += [end(q, T0 + 15.9, signal="SIGTERM", signal_forwarded=True) for q in (0, 1)]
    alerts = everything(job.records + deaths, T0 + 300)
    assert brief(alerts) == [(FAILED, "firing", None, 20)]
    now = open_alerts()[FAILED]
    assert now["first_rank"] == 2 and now["failed_ranks"] == [0, 1, 2]
    assert now["summary"].endswith("; ranks 0-1 were stopped after it by their launcher"), now["summary"]


def test_a_job_stopped_from_outside_is_no_failure():
    # scancel or a time limit: the scheduler's SIGTERM reaches every rank's launcher, which passes it on
    job = ddp_job(ranks=2, steps=100, last_step={0: 20, 1: 20}, silent_at={0: T0 + 15.2, 1: T0 + 15.2},
                  until=T0 + 15.2)
    stops = [end(q, T0 + 15.3, signal="SIGTERM", signal_forwarded=True) for q in (0, 1)]
    assert everything(job.records + stops, T0 + 600) == []


def test_an_abort_after_a_collective_timeout_while_the_others_train_on_is_named():
    # the watchdog's text says a collective broke, but rank 0 goes on finishing steps: nothing else explains it
    job = ddp_job(ranks=2, steps=60, last_step={1: 20}, silent_at={1: T0 + 15.2}, until=T0 + 40)
    alerts = everything(job.records + [end(1, T0 + 15.25, signal="SIGABRT", stderr_tail=WATCHDOG)], T0 + 40)
    assert brief(alerts) == [(FAILED, "firing", None, 20)]
    a = alerts[0]
    assert a["summary"].startswith("rank 1 died at step 20: aborted (SIGABRT): terminate called after throwing an "
                                   "instance of 'c10::DistBackendError': [PG 0 Rank 1] Watchdog caught collective "
                                   "operation timeout: WorkNCCL(SeqNum=9, OpType=ALLREDUCE) ran for 600045 "
                                   "milliseconds before timing out.; the other ranks train on"), a["summary"]
    assert a["time"] <= T0 + 17.0  # at rank 0's next steps, not after a limit


def test_a_rank_that_dies_again_is_a_new_incident_and_its_new_process_resolves_the_last():
    job = ddp_job(ranks=2, steps=100, until=T0 + 60)
    recs = [r for r in job.records if not (r.rank == 1 and T0 + 15.2 < r.time < T0 + 20)]
    recs += [end(1, T0 + 15.25, signal="SIGKILL"), end(1, T0 + 40.0, exit_code=13)]
    recs = [r for r in recs if not (r.rank == 1 and T0 + 39.9 < r.time < T0 + 45) or r.type == "end"]
    alerts = everything(recs, T0 + 60)
    assert [(a["state"], a.get("signal"), a.get("exit_code")) for a in alerts if a["alert"] == FAILED] == [
        ("firing", "SIGKILL", None), ("resolved", None, None), ("firing", None, 13), ("resolved", None, None)]
    assert [a["summary"] for a in alerts if a["state"] == "resolved"] == [
        "rank 1 trains again after its death", "rank 1 trains again after its death"]


# -- without the launcher: quiet since before a peer's collective error ----------------------------------
def test_the_rank_quiet_before_its_peers_collective_error_is_named_at_once_when_it_is_the_only_one():
    job = ddp_job(ranks=2, steps=200, last_step={0: 150, 1: 150}, silent_at={1: T0 + 85.4}, until=T0 + 85.55)
    crash = end(0, T0 + 85.6, 150, error=PEER)
    alerts = everything(job.records + [crash], T0 + 300)
    assert brief(alerts) == [(STALL, "firing", None, 150)]
    a = alerts[0]
    assert a["time"] == pytest.approx(T0 + 85.6 + 1.5)  # the peer's error + 1.5 s for a launcher's word
    assert a["summary"].startswith("rank 1 exited without an end record after step 150: nothing from it for ")
    assert "rank 0 failed after it with a collective error (RuntimeError: [../third_party/gloo" in a["summary"]
    assert (a["root_ranks"], a["failed_ranks"], a["reason"]) == ([1], [0], "silent")


def test_ranks_blocked_in_the_collective_keep_heartbeating_and_only_the_quiet_one_is_named():
    # rank 2 is killed; its neighbour rank 3 fails with the peer error; ranks 0-1 wait in the all-reduce,
    # quiet between heartbeats (5 s) at the moment of the error: they must not be named
    job = ddp_job(ranks=4, steps=200, last_step={q: 150 for q in range(4)}, silent_at={2: T0 + 85.4, 3: T0 + 85.6},
                  until=T0 + 300)
    crash = end(3, T0 + 85.6, 150, error=PEER)
    last_2 = max(r.time for r in job.records if r.rank == 2)
    alerts = everything(job.records + [crash], T0 + 300)
    assert brief(alerts) == [(STALL, "firing", None, 150)]
    a = alerts[0]
    assert (a["root_ranks"], a["failed_ranks"], a["waiting_ranks"]) == ([2], [3], [0, 1])
    assert a["time"] == pytest.approx(last_2 + 1.5 * 5.0 + 1.5)  # 1.5 heartbeat periods and the grace
    assert a["summary"].startswith("rank 2 exited without an end record after step 150")


def test_the_launchers_word_arriving_within_the_grace_takes_the_incident_alone():
    job = ddp_job(ranks=2, steps=200, last_step={0: 150, 1: 150}, silent_at={1: T0 + 85.4}, until=T0 + 85.55)
    recs = [end(0, T0 + 85.6, 150, error=PEER), end(1, T0 + 86.2, signal="SIGKILL")]
    alerts = everything(job.records + recs, T0 + 300)
    # (every rank has ended then: the run's alerts resolve, issue 23)
    assert brief(alerts) == [(FAILED, "firing", None, 150), (FAILED, "resolved", None, 150)]
    assert alerts[0]["summary"].startswith("rank 1 died at step 150: killed by SIGKILL")
    assert alerts[1]["summary"] == "run failed at step 150 (ranks 0-1 ended failed)"


# -- without the launcher: a survivor stopped by SIGTERM (its client's own end, trainer/sigterm.py) ----------
STOPPED = "stopped by SIGTERM (asked to stop: torchrun stopping the workers after a rank died, the scheduler or a user)"


@pytest.mark.parametrize("order", ["sigterm-only", "collective-error-then-sigterm"])
def test_a_peer_killed_silently_is_named_at_once_when_the_survivor_reports_its_sigterm(order):
    # bare torchrun: rank 1 SIGKILLed; the agent SIGTERMs rank 0 (blocked in the all-reduce), whose client says so.
    # Or rank 0's gloo error came first, then the agent's SIGTERM: the same incident, named as fast.
    job = ddp_job(ranks=2, steps=200, last_step={0: 150, 1: 150}, silent_at={1: T0 + 85.4}, until=T0 + 85.55)
    stop = [end(0, T0 + 85.6, 150, signal="SIGTERM")]
    if order != "sigterm-only":
        stop = [end(0, T0 + 85.58, 150, error=PEER), end(0, T0 + 85.6, 150, signal="SIGTERM")]
    alerts = everything(job.records + stop, T0 + 300)
    assert brief(alerts) == [(STALL, "firing", None, 150)]  # no rank_failed: rank 0's end is a consequence
    a = alerts[0]
    assert a["time"] == pytest.approx(stop[0].time + 1.5)  # within 1.5 s of the survivor's end
    assert (a["root_ranks"], a["failed_ranks"], a["reason"]) == ([1], [0], "silent")
    quiet = a["time"] - max(r.time for r in job.records if r.rank == 1)
    if order == "sigterm-only":
        assert a["summary"].startswith(f"rank 1 exited without an end record after step 150: nothing from it for "
                                       f"{quiet:.1f} s while a peer was stopped (killed by a signal"), a["summary"]
        assert f"; rank 0 was stopped after it ({STOPPED}); limit {quiet:.1f} s: quiet since before rank 0 was " \
            "stopped (every other rank had finished)" in a["summary"], a["summary"]
    else:  # its collective error is what it said first, and stays its word
        assert "; rank 0 failed after it with a collective error (RuntimeError: [../third_party/gloo" in a["summary"]


def test_a_rank_stopped_by_a_user_then_its_peer_by_torchrun_is_no_failure():
    # a user SIGTERMs rank 1; torchrun's agent sees it die and stops rank 0 (waiting in the all-reduce, between two
    # heartbeats) 0.3 s later: a stop, told within the 1.5 s a suspect is given to speak
    job = ddp_job(ranks=2, steps=200, last_step={0: 150, 1: 150}, silent_at={1: T0 + 85.4, 0: T0 + 85.7},
                  until=T0 + 85.7)
    stops = [end(1, T0 + 85.45, 150, signal="SIGTERM"), end(0, T0 + 85.75, 150, signal="SIGTERM")]
    assert everything(job.records + stops, T0 + 600) == []


@pytest.mark.parametrize("how", [
    {"signal": "SIGTERM"},  # scancel, a preemption, torchrun's agent stopping everyone: each client says so
    {"signal": "SIGTERM", "signal_forwarded": True},  # the same under trainhealth.launch
    {"error": {"type": "KeyboardInterrupt", "message": "", "traceback": "..."}},  # Ctrl-C to torchrun
], ids=["client", "launcher", "ctrl-c"])
def test_a_job_stopped_on_every_rank_is_no_failure_however_the_stop_is_reported(how):
    job = ddp_job(ranks=4, steps=100, last_step={q: 20 for q in range(4)}, silent_at={q: T0 + 15.2 for q in range(4)},
                  until=T0 + 15.2)
    stops = [end(q, T0 + 15.3 + 0.05 * q, 20, **how) for q in range(4)]
    assert everything(job.records + stops, T0 + 600) == []
    ranks = live_traces.last_pipeline.runs[RUN].ranks
    assert all(r.ended for r in ranks.values())


def test_a_stop_after_a_real_crash_is_listed_as_a_stop_not_a_collective_error():
    # rank 2 crashes on its own; torchrun stops the others (bare: their clients report the SIGTERM); rank 3 is
    # still to go (once every rank ended, the run's alerts resolve)
    job = ddp_job(ranks=4, steps=100, last_step={q: 20 for q in range(4)}, silent_at={q: T0 + 15.2 for q in range(4)},
                  until=T0 + 15.2)
    deaths = [end(2, T0 + 15.25, 20, error=CUDA)] + [end(q, T0 + 15.9, 20, signal="SIGTERM") for q in (0, 1)]
    alerts = everything(job.records + deaths, T0 + 300)
    assert brief(alerts) == [(FAILED, "firing", None, 20)]
    now = open_alerts()[FAILED]
    assert now["first_rank"] == 2 and now["failed_ranks"] == [0, 1, 2]
    assert now["summary"] == ("rank 2 failed at step 20: RuntimeError: CUDA error: unspecified launch failure; "
                              "rank 3 waits in a collective; ranks 0-1 were stopped after it by SIGTERM")


# -- words and records ------------------------------------------------------------------------------------
def test_last_words_find_the_runtimes_own_line():
    assert last_words("terminate called recursively\n") == "terminate called recursively"
    assert last_words("\nsome log\nRuntimeError: CUDA error: an illegal memory access\n\n") == \
        "RuntimeError: CUDA error: an illegal memory access"
    assert last_words(None) == "" and last_words("") == ""
    assert death(ErrorInfo(type="RuntimeError", message="x"), signal="SIGABRT").cause == "exception"
    assert death(None, signal="SIGABRT", stderr_tail=WATCHDOG).peer is True  # the watchdog: a consequence
    assert death(None, signal="SIGTERM", forwarded=True).cause == "stopped"
    said = death(None, signal="SIGTERM")  # not passed on by a launcher: the client's own word, or a kill of the child
    assert (said.quoted, said.cause, said.peer) == (STOPPED, "stopped", True)
    said = death(ErrorInfo(type="KeyboardInterrupt", message="", traceback=""))
    assert (said.quoted, said.cause, said.peer) == ("stopped by Ctrl-C (KeyboardInterrupt: SIGINT)", "stopped", True)


def test_an_end_needs_no_step_but_its_new_fields_are_checked_by_name():
    assert from_obj({"type": "end", "run": RUN, "rank": 1, "time": T0, "status": "failed", "signal": "SIGKILL"}).step \
        is None
    with pytest.raises(RecordError, match="^signal: must be a signal name such as 'SIGKILL'"):
        from_obj({"type": "end", "run": RUN, "rank": 1, "time": T0, "signal": "kill"})
    with pytest.raises(RecordError, match="^exit_code: "):
        from_obj({"type": "end", "run": RUN, "rank": 1, "time": T0, "exit_code": "13"})
    with pytest.raises(RecordError, match="^oom_killed: "):
        from_obj({"type": "end", "run": RUN, "rank": 1, "time": T0, "oom_killed": 1})
    with pytest.raises(RecordError, match="^step: required for a 'heartbeat' record"):
        from_obj({"type": "heartbeat", "run": RUN, "rank": 1, "time": T0})


# -- the launcher's pure parts ----------------------------------------------------------------------------
def test_the_launchers_end_record_says_what_it_saw():
    s = ClientSettings(run="r", rank=3)
    common = {"now": 5.0, "oom": {}}
    assert end_record(s, 0, "", forwarded=None, **common) is None  # a clean exit: the client said it
    assert end_record(s, 13, "bye\n", forwarded=None, **common) == {
        "type": "end", "run": "r", "rank": 3, "time": 5.0, "status": "failed", "exit_code": 13, "stderr_tail": "bye\n"}
    assert end_record(s, -signal.SIGTERM, "", forwarded=signal.SIGTERM, **common)["signal_forwarded"] is True
    oom = end_record(s, -signal.SIGKILL, "", forwarded=None, now=5.0, oom={"oom_killed": True}, peak=9.0e8,
                     limit=1.0e9)
    assert (oom["signal"], oom["oom_killed"], oom["host_mem_bytes"], oom["host_mem_limit_bytes"]) == \
        ("SIGKILL", True, 9.0e8, 1.0e9)
    other = end_record(s, -signal.SIGSEGV, "", forwarded=None, now=5.0, oom={}, peak=1.0, limit=2.0)
    assert "oom_killed" not in other and "host_mem_bytes" not in other  # the verdict: tests/unit/test_oom_cause.py


def test_the_stderr_tail_is_bounded_and_starts_at_a_line():
    tail = Tail(limit=1000)
    for i in range(500):
        tail.add(f"line {i}\n".encode())
    assert len(tail.data) <= 2000
    text = tail.text(chars=100)
    assert text.endswith("line 499\n") and text.startswith("line ") and len(text) <= 100


def test_the_launchers_cgroup_reading_v1_and_v2(tmp_path: Path):
    # the limiting cgroup and its OOM-kill count are the memory readers' (limiting_cgroup, oom_kills); the
    # launcher adds the peak usage
    v1 = tmp_path / "memory" / "job" / "rank1"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text("167772160\n")
    (v1 / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    (v1 / "memory.max_usage_in_bytes").write_text("104857600\n")
    cg = tmp_path / "cgroup"
    cg.write_text("4:memory:/job/rank1\n")
    found = host_memory.limiting_cgroup(tmp_path, cg)
    assert found is not None and (found.path, found.version, found.limit) == (v1, 1, 167772160.0)
    assert (host_memory.oom_kills(v1, 1), host_memory.peak_bytes(v1, 1)) == (2, 104857600.0)
    v2 = tmp_path / "job.slice"
    v2.mkdir()
    (v2 / "memory.events").write_text("low 0\nhigh 0\nmax 5\noom 1\noom_kill 1\noom_group_kill 0\n")
    assert (host_memory.oom_kills(v2, 2), host_memory.peak_bytes(v2, 2)) == (1, None)  # no memory.peak
    (v2 / "memory.peak").write_text("2048\n")
    assert host_memory.peak_bytes(v2, 2) == 2048.0


def test_the_report_says_how_each_failed_rank_died():
    from trainhealth.page import story
    from trainhealth.page.report import RunRecording

    run = RunRecording(RUN)
    run.add(end(0, T0, 3, error=CUDA))
    run.add(end(1, T0 + 1, signal="SIGKILL", oom_killed=True, host_mem_bytes=2.0**30,
                host_mem_limit_bytes=2.0**30))
    html = story.outcome_html(run.ends, run.rank_list(), run.starts, [], [])
    assert "rank 0 failed at step 3: <code>RuntimeError: CUDA error: unspecified launch failure</code>" in html
    assert ("rank 1 then failed: <code>killed by the kernel&#x27;s OOM killer at 1.0 GiB of its 1.0 GiB "
            "limit (SIGKILL)</code>") in html


def test_a_late_sample_from_before_a_collective_error_is_not_training_on():
    # rank 0's step-21 sample was measured before rank 1's error and arrives after it: rank 0 did not train on
    job = ddp_job(ranks=2, steps=100, last_step={0: 20, 1: 20}, silent_at={0: T0 + 15.2, 1: T0 + 15.2},
                  until=T0 + 15.2)
    late = from_obj({"run": RUN, "rank": 0, "time": T0 + 15.18, "step": 21, "loss": 2.0})
    recs = sorted(job.records, key=lambda r: r.time) + [end(1, T0 + 15.2, 20, error=PEER), late]
    alerts = feed(recs, until=T0 + 20.0)
    assert [a for a in alerts if a["alert"] == FAILED] == []  # a consequence alone: rank_stalled's to name
