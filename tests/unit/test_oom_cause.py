"""Whether the OOM killer killed a rank: the kernel log names its victim, the counters only count kills.

The parser reads real kernel log lines (v1 and v2 memory cgroups, kernels 4.15 to 6.18, with and without
the memcg line and the rate-limited summary); the launcher's verdict is pure (what it read in, the fields
out); the sidecar's words for each verdict go through the real Pipeline. The real kernel: tests/e2e/
test_oom_cause.py."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from trainhealth.detectors.helpers.incident import OomFacts, death
from trainhealth.record import RecordError, from_obj
from trainhealth.trainer import host_memory
from trainhealth.trainer.kernel_log import KernelLog, OomKill, oom_kill, oom_kills
from trainhealth.trainer.launch import OomWitness, descendants, end_record, oom_verdict
from trainhealth.trainer.settings import ClientSettings

from tests import live_traces
from tests.live_traces import RUN, T0, brief, ddp_job, feed

# /dev/kmsg records as this machine's kernel (6.18, cgroup v1) wrote them for a memcg OOM kill
KMSG_618_V1 = [
    "4,3356,11087627133,-;python invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=0, oom_score_adj=0\n",
    "4,3362,11087627211,-; oom_kill_process.cold+0x8/0x8a\n",
    "6,3433,11087627625,-;[  pid  ]   uid  tgid total_vm      rss rss_anon rss_file rss_shmem pgtables_bytes "
    "swapents oom_score_adj name\n",
    "6,3437,11087627643,-;oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,"
    "oom_memcg=/trainhealth-memory-6000-7a991c,task_memcg=/trainhealth-memory-6000-7a991c,task=python,pid=7811,"
    "uid=0\n",
    "3,3438,11087627685,-;Memory cgroup out of memory: Killed process 7811 (python) total-vm:3065996kB, "
    "anon-rss:2241248kB, file-rss:95532kB, shmem-rss:0kB, UID:0 pgtables:4932kB oom_score_adj:0\n",
]
# dmesg lines of a cgroup v2 kernel (5.15, systemd service with MemoryMax), a DataLoader worker killed
DMESG_515_V2 = [
    "[81234.112233] pt_data_worker invoked oom-killer: gfp_mask=0x1100cca(GFP_HIGHUSER_MOVABLE), order=0, "
    "oom_score_adj=0",
    "[81234.112301] memory: usage 8388608kB, limit 8388608kB, failcnt 0",
    "[81234.112420] oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,"
    "oom_memcg=/system.slice/train.service,task_memcg=/system.slice/train.service,task=pt_data_worker,pid=40412,"
    "uid=1000",
    "[81234.112467] Memory cgroup out of memory: Killed process 40412 (pt_data_worker) total-vm:9132788kB, "
    "anon-rss:5120444kB, file-rss:63712kB, shmem-rss:2048kB, UID:1000 pgtables:10440kB oom_score_adj:0",
    "[81234.140211] oom_reaper: reaped process 40412 (pt_data_worker), now anon-rss:0kB, file-rss:0kB, shmem-rss:0kB",
]
# a 4.15 kernel (cgroup v1, docker): the memcg line "Task in ... killed as a result of limit of ...", no summary
# line yet, an intention ("Kill process ... or sacrifice child") and then the victim
DMESG_415_V1 = [
    "[ 1043.572210] python invoked oom-killer: gfp_mask=0x14000c0(GFP_KERNEL), nodemask=(null), order=0, "
    "oom_score_adj=0",
    "[ 1043.572301] Task in /docker/3f2a killed as a result of limit of /docker/3f2a",
    "[ 1043.572305] memory: usage 524288kB, limit 524288kB, failcnt 9612",
    "[ 1043.572397] Memory cgroup out of memory: Kill process 2311 (python) score 1007 or sacrifice child",
    "[ 1043.572560] Killed process 2318 (python) total-vm:1112280kB, anon-rss:518652kB, file-rss:22856kB, "
    "shmem-rss:0kB",
]
# a machine-wide OOM on a 5.4 kernel whose summary was rate-limited away (a burst of kills): no memcg line
DMESG_54_GLOBAL = [
    "[  512.000001][ T4321] Out of memory: Killed process 4321 (stress) total-vm:4200000kB, anon-rss:4100000kB, "
    "file-rss:0kB, shmem-rss:0kB, UID:1000 pgtables:8100kB oom_score_adj:0",
]

# a machine-wide OOM on a 6.0 kernel (cgroup v2): the summary names the victim's cgroup but no limited one
DMESG_60_GLOBAL_V2 = [
    "[ 7001.100200] oom-kill:constraint=CONSTRAINT_NONE,nodemask=(null),cpuset=/,mems_allowed=0,global_oom,"
    "task_memcg=/user.slice/user-1000.slice/session-2.scope,task=python3,pid=5555,uid=1000",
    "[ 7001.100300] Out of memory: Killed process 5555 (python3) total-vm:16932204kB, anon-rss:15744000kB, "
    "file-rss:4kB, shmem-rss:0kB, UID:1000 pgtables:31000kB oom_score_adj:0",
]


@pytest.mark.parametrize("lines, want", [
    (KMSG_618_V1, [OomKill(7811, "python", "/trainhealth-memory-6000-7a991c", "/trainhealth-memory-6000-7a991c")]),
    (DMESG_515_V2, [OomKill(40412, "pt_data_worker", "/system.slice/train.service", "/system.slice/train.service")]),
    (DMESG_415_V1, [OomKill(2318, "python")]),  # the victim, not the process it meant to kill
    (DMESG_54_GLOBAL, [OomKill(4321, "stress")]),
    (DMESG_60_GLOBAL_V2, [OomKill(5555, "python3", "/user.slice/user-1000.slice/session-2.scope")]),
], ids=["kmsg-6.18-v1-memcg", "dmesg-5.15-v2-child", "dmesg-4.15-v1-memcg-line", "dmesg-5.4-global-no-summary",
        "dmesg-6.0-global-v2-summary"])
def test_the_kernel_log_names_each_oom_killers_victim_once(lines, want):
    assert oom_kills(lines) == want


def test_lines_that_name_no_victim_are_not_kills():
    for line in ["[ 1043.572397] Memory cgroup out of memory: Kill process 2311 (python) score 1007 or sacrifice child",
                 "[81234.140211] oom_reaper: reaped process 40412 (python), now anon-rss:0kB, file-rss:0kB",
                 "4,3356,11087627133,-;python invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=0",
                 "6,5666,19817216497,-;th-mn2676b: port 2(th-mn2676h1) entered disabled state",
                 # a process wrote this to /dev/kmsg (facility user: 14 = 1 * 8 + 6): anyone can write anything
                 "14,5670,19817216600,-;Out of memory: Killed process 2966 (python) total-vm:1kB"]:
        assert oom_kill(line) is None, line
    # the same words from the kernel (facility 0), with the caller id in the prefix and a dictionary line after
    kernel = "3,5671,19817216700,-,caller=T77;Out of memory: Killed process 2966 (a b) c) total-vm:1kB\n SUBSYSTEM=x\n"
    assert oom_kill(kernel) == OomKill(2966, "a b) c")


def test_the_kernel_log_returns_only_what_was_logged_since_it_was_opened(tmp_path):
    if os.geteuid() != 0 or not os.access("/dev/kmsg", os.R_OK | os.W_OK):
        pytest.skip("reading and writing /dev/kmsg needs root")  # the e2e test fails in CI without it
    log = KernelLog()
    assert log.error is None
    mark = f"trainhealth-oomcause-{os.getpid()} test mark"
    with open("/dev/kmsg", "w") as kmsg:
        kmsg.write(mark + "\n")
    got = log.read()
    assert got is not None and [line for line in got if mark in line][0].startswith("12,")  # user.notice
    assert log.read() == []  # nothing new, and no wait
    with open("/dev/kmsg", "w") as kmsg:  # a process's forgery: the user facility, not the kernel's
        kmsg.write(f"Out of memory: Killed process {os.getpid()} (python) total-vm:1kB\n")
    assert log.take() and log.kills == {} and log.logged == 0
    log.close()
    missing = KernelLog(str(tmp_path / "no-kmsg"))
    assert missing.read() is None and missing.error is not None and "No such file" in missing.error


def test_the_cgroup_the_kernel_log_names_is_found_with_its_limit_v1_and_v2(tmp_path):
    v2 = tmp_path / "v2"
    (v2 / "job" / "rank1").mkdir(parents=True)
    (v2 / "job" / "rank1" / "memory.max").write_text("167772160\n")
    found = host_memory.named_cgroup("/job/rank1", v2)
    assert found is not None and (found.path, found.version, found.limit) == (v2 / "job" / "rank1", 2, 167772160.0)
    v1 = tmp_path / "v1"
    (v1 / "memory" / "job").mkdir(parents=True)
    (v1 / "memory" / "job" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # no limit
    assert host_memory.named_cgroup("/job", v1) is None
    (v1 / "memory" / "job" / "memory.limit_in_bytes").write_text("1048576\n")
    found = host_memory.named_cgroup("/job", v1)
    assert found is not None and (found.version, found.limit) == (1, 1048576.0)
    assert host_memory.named_cgroup("/elsewhere", v1) is None  # another cgroup namespace's path


def test_the_count_read_is_the_ranks_own_cgroups_v1_and_v2(tmp_path):
    # v1 counts a kill in the victim's cgroup alone: a rank in a subgroup of the limited one is counted there
    v1 = tmp_path / "v1"
    (v1 / "memory" / "job" / "rank1").mkdir(parents=True)
    (v1 / "memory" / "job" / "memory.limit_in_bytes").write_text("167772160\n")
    (v1 / "memory" / "job" / "rank1" / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
    procs = tmp_path / "cgroup"
    procs.write_text("9:name=systemd:/\n4:memory:/job/rank1\n0::/\n")
    own = host_memory.own_cgroup(v1, procs)
    assert own is not None and (own.path, own.version) == (v1 / "memory" / "job" / "rank1", 1)
    assert host_memory.oom_kills(own.path, own.version) == 1
    v2 = tmp_path / "v2"
    (v2 / "job").mkdir(parents=True)
    (v2 / "job" / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    procs.write_text("0::/job\n")
    own = host_memory.own_cgroup(v2, procs)
    assert own is not None and (own.path, own.version) == (v2 / "job", 2)
    assert host_memory.own_cgroup(v2, tmp_path / "gone") is None


def test_the_ranks_descendants_are_listed_from_proc(tmp_path):
    # a child that starts a grandchild (a DataLoader worker's own helper): both are the rank's
    rank = subprocess.Popen(["sh", "-c", f"sleep 30 & echo $! > {tmp_path / 'grandchild'}; wait"])
    sleeper = None
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "grandchild").exists() or not (tmp_path / "grandchild").read_text().strip():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        sleeper = int((tmp_path / "grandchild").read_text())
        assert sleeper in descendants(rank.pid) and descendants(os.getpid()) >= {rank.pid, sleeper}
        assert descendants(2**22 + 1) == set()  # no such process
    finally:
        if sleeper is not None:
            os.kill(sleeper, signal.SIGKILL)
        rank.kill()
        rank.wait(10)


# -- the launcher's verdict (pure) ---------------------------------------------------------------------------
KILL, SEGV = -signal.SIGKILL, -signal.SIGSEGV
LOGGED = [OomKill(40, "python"), OomKill(77, "pt_data_worker")]


@pytest.mark.parametrize("code, pid, children, seen, want", [
    # the kernel log decides wherever it can be read, whatever the counters say
    (KILL, 40, (), OomWitness(LOGGED, machine=(3, 5)),
     {"oom_killed": True, "oom_check": "kernel_log", "oom_killed_pid": 40, "oom_killed_comm": "python"}),
    (KILL, 41, (), OomWitness(LOGGED, machine=(3, 5), cgroup=(0, 1)), {"oom_check": "kernel_log"}),
    (1, 41, {77, 78}, OomWitness(LOGGED), {"oom_check": "kernel_log", "oom_killed_pid": 77,
                                           "oom_killed_comm": "pt_data_worker", "oom_child": True}),
    (SEGV, 41, (), OomWitness(LOGGED, machine=(3, 5)), {}),
    # without it: the job's own cgroup's count decides; the machine's can only clear a SIGKILL
    (KILL, 41, (), OomWitness(None, "/dev/kmsg: Permission denied", cgroup=(2, 3), machine=(3, 9)),
     {"oom_killed": True, "oom_check": "cgroup_count"}),
    (KILL, 41, (), OomWitness(None, "x", cgroup=(2, 2), machine=(3, 9)), {"oom_check": "cgroup_count"}),
    (KILL, 41, (), OomWitness(None, "x", machine=(3, 3)), {"oom_check": "machine_count"}),
    (KILL, 41, (), OomWitness(None, "/dev/kmsg: Permission denied", machine=(3, 5)),
     {"oom_check": "unproven", "oom_doubt": "the kernel log cannot be read (/dev/kmsg: Permission denied) and the "
      "only OOM-kill count is the machine's, which rose by 2 while it ran: any process on the machine"}),
    (KILL, 41, (), OomWitness(None, "x"), {"oom_check": "unproven", "oom_doubt": "the kernel log cannot be read (x) "
                                           "and no OOM-kill count either"}),
    (13, 41, (), OomWitness(None, "x", machine=(3, 5)), {}),
], ids=["log-names-rank", "log-names-another", "log-names-child", "segv", "cgroup-rose", "cgroup-flat",
        "machine-flat", "machine-rose-unproven", "nothing-readable", "exit-code"])
def test_only_the_kernel_log_or_the_jobs_own_cgroup_prove_an_oom_kill(code, pid, children, seen, want):
    assert oom_verdict(code, pid, children, seen) == want


def test_the_end_record_carries_the_verdict_and_the_cgroups_figures_with_a_kill():
    s = ClientSettings(run="r", rank=3)
    assert end_record(s, 0, "", forwarded=None, now=5.0, oom={}) is None  # a clean exit: the client said it
    assert end_record(s, 13, "bye\n", forwarded=None, now=5.0, oom={}, pid=41, peak=1.0, limit=2.0) == {
        "type": "end", "run": "r", "rank": 3, "time": 5.0, "status": "failed", "pid": 41, "exit_code": 13,
        "stderr_tail": "bye\n"}
    oom = end_record(s, KILL, "", forwarded=None, now=5.0, oom={"oom_killed": True, "oom_check": "kernel_log"},
                     pid=41, peak=9.0e8, limit=1.0e9)
    assert oom is not None and (oom["signal"], oom["oom_killed"], oom["host_mem_bytes"]) == ("SIGKILL", True, 9.0e8)
    assert from_obj(oom).oom_check == "kernel_log"  # the sidecar takes what the launcher sends
    with pytest.raises(RecordError, match="^oom_check: "):
        from_obj({**oom, "oom_check": "guess"})


# -- the sidecar's words ---------------------------------------------------------------------------------------
def end(**fields) -> object:
    return from_obj({"type": "end", "run": RUN, "rank": 1, "time": T0 + 15.25, "status": "failed", "pid": 4242,
                     **fields})


GIB = 2**30


@pytest.mark.parametrize("fields, cause, words", [
    ({"signal": "SIGKILL", "oom_killed": True, "oom_check": "kernel_log", "oom_killed_pid": 4242,
      "host_mem_bytes": 3.5 * GIB, "host_mem_limit_bytes": 4 * GIB}, "oom_killer",
     "killed by the kernel's OOM killer at 3.5 GiB of its 4.0 GiB limit (SIGKILL, per the kernel log)"),
    ({"signal": "SIGKILL", "oom_killed": True, "oom_check": "cgroup_count", "host_mem_limit_bytes": 4 * GIB},
     "oom_killer", "killed by the kernel's OOM killer at its 4.0 GiB limit (SIGKILL, per its cgroup's OOM-kill "
     "count: the kernel log could not be read)"),
    ({"signal": "SIGKILL", "oom_check": "kernel_log"}, "signal",
     "killed by SIGKILL (not the OOM killer, per the kernel log: a user, the scheduler or a watchdog)"),
    ({"signal": "SIGKILL", "oom_check": "machine_count"}, "signal",
     "killed by SIGKILL (not the OOM killer: it killed nothing on the machine while the rank ran: a user, the "
     "scheduler or a watchdog)"),
    ({"signal": "SIGKILL", "oom_check": "unproven", "oom_doubt": "the kernel log cannot be read (/dev/kmsg: "
      "Permission denied) and the only OOM-kill count is the machine's, which rose by 1 while it ran: any process "
      "on the machine"}, "signal",
     "killed by SIGKILL (possibly the OOM killer: the kernel log cannot be read (/dev/kmsg: Permission denied) and "
     "the only OOM-kill count is the machine's, which rose by 1 while it ran: any process on the machine; `dmesg` "
     "on its host says whether it killed pid 4242)"),
    ({"exit_code": 1, "oom_check": "kernel_log", "oom_child": True, "oom_killed_pid": 4250,
      "oom_killed_comm": "pt_data_worker", "host_mem_bytes": 3.9 * GIB, "host_mem_limit_bytes": 4 * GIB,
      "stderr_tail": "RuntimeError: DataLoader worker (pid 4250) is killed by signal: Killed.\n"}, "oom_killer",
     "its child process 4250 (pt_data_worker) was killed by the kernel's OOM killer at 3.9 GiB of its 4.0 GiB "
     "limit (per the kernel log), then it exited with code 1: RuntimeError: DataLoader worker (pid 4250) is killed "
     "by signal: Killed."),
], ids=["oom-kernel-log", "oom-cgroup-count", "kill-ruled-out-by-log", "kill-ruled-out-by-machine", "kill-unproven",
        "child-oom"])
def test_a_sigkill_is_called_the_oom_killers_only_when_proven(fields, cause, words):
    job = ddp_job(ranks=2, steps=100, last_step={0: 20, 1: 20}, silent_at={1: T0 + 15.2}, until=T0 + 300)
    alerts = [a for a in feed(sorted(job.records + [end(**fields)], key=lambda r: r.time), until=T0 + 300)
              if a["alert"] in ("rank_stalled", "rank_failed")]
    assert brief(alerts) == [("rank_failed", "firing", None, 20)]
    assert alerts[0]["summary"] == f"rank 1 died at step 20: {words}; rank 0 waits in a collective"
    assert alerts[0]["cause"] == cause and alerts[0]["oom_killed"] is bool(fields.get("oom_killed"))
    assert live_traces.last_pipeline is not None


def test_the_clients_exception_names_the_child_the_oom_killer_killed():
    error = {"type": "RuntimeError", "message": "DataLoader worker (pid 4250) is killed by signal: Killed.",
             "traceback": "..."}
    from trainhealth.record import ErrorInfo
    oom = OomFacts("kernel_log", None, 4242, 4250, "pt_data_worker", True)
    said = death(ErrorInfo(**error), exit_code=1, oom=oom)
    assert (said.quoted, said.cause) == (
        "RuntimeError: DataLoader worker (pid 4250) is killed by signal: Killed. (its child process 4250 "
        "(pt_data_worker) was killed by the kernel's OOM killer (per the kernel log))", "oom_killer")
    said = death(None, signal="SIGKILL", oom=oom, memory=2**30, limit=2**30)  # killed after its child was
    assert said.quoted == ("its child process 4250 (pt_data_worker) was killed by the kernel's OOM killer at 1.0 GiB "
                           "of its 1.0 GiB limit (per the kernel log), then it was killed by SIGKILL")
    # an older launcher's end (no oom_check): the words it always had
    assert death(None, signal="SIGKILL", oom_killed=True).quoted == "killed by the kernel's OOM killer (SIGKILL)"
    assert death(None, signal="SIGKILL").quoted == \
        "killed by SIGKILL (cannot be caught: the OOM killer, the scheduler or a user)"
