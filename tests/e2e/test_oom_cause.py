"""The OOM killer named only when the kernel says it killed that process: the real kernel, a real sidecar.

The launcher (``python -m trainhealth.launch``) runs outside any memory cgroup with a limit (as on this
machine), where the only OOM-kill count is the machine's: so any OOM kill on the machine while a rank runs
used to read as that rank's. Three ranks, each through the real sidecar to a ``rank_failed`` alert:

* a rank SIGKILLed from outside the moment an unrelated process in a cgroup of its own is OOM-killed (the
  machine's count rose while the rank ran): "not the OOM killer, per the kernel log";
* a rank that moves itself into a small memory cgroup and allocates until the kernel kills it: the kernel
  log names its pid, and the cgroup the log names gives the limit;
* a rank whose child (a DataLoader worker's part) is OOM-killed in that cgroup, and which then fails with
  PyTorch's words: the child is named.

Without the kernel log (a launcher run blind to it): the rank's own limited cgroup's count proves an OOM
kill, and a kill -9 beside an unrelated OOM kill is "unproven", with why.

Needs root (memory cgroups, /dev/kmsg): skipped without it; as root, both are required in CI. Cgroups are
named ``trainhealth-oomcause-<pid>-<what>`` and removed at the end.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest
from trainhealth.trainer.host_memory import machine_oom_kills

from tests.conftest import IN_CI, ROOT, Sidecar, python_path

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

WORKER = str(ROOT / "tests" / "e2e" / "death_worker.py")
LIMIT = 160 << 20
NAMED_WITHIN = 5.0
HOG = "b = []\nwhile True:\n    b.append(b'x' * (4 << 20))\n"
# a rank whose child allocates in the cgroup until the OOM killer kills it; then it fails as a DataLoader does
WITH_CHILD = """
import subprocess, sys, time
from trainhealth import Telemetry
tm = Telemetry()
tm.record(1, loss=1.0)
tm.flush(5.0)
child = subprocess.Popen(["sh", "-c", 'echo $$ > "$0" && exec "$@"', sys.argv[1], sys.executable, "-c",
                          "import time\\ntime.sleep(2.5)\\n" + sys.argv[2]])
child.wait()
raise RuntimeError(f"DataLoader worker (pid {child.pid}) is killed by signal: Killed.")
"""


class Cgroup:
    """A memory cgroup of its own (v1 or v2) with a limit and no swap; removed at the end."""

    def __init__(self, what: str, limit: int) -> None:
        name = f"trainhealth-oomcause-{os.getpid()}-{what}"
        v1 = Path("/sys/fs/cgroup/memory")
        self.path = v1 / name if v1.is_dir() else Path("/sys/fs/cgroup") / name
        self.path.mkdir()
        if v1.is_dir():
            (self.path / "memory.limit_in_bytes").write_text(str(limit))
            if (self.path / "memory.memsw.limit_in_bytes").exists():
                (self.path / "memory.memsw.limit_in_bytes").write_text(str(limit))
        else:
            (self.path / "memory.max").write_text(str(limit))
            (self.path / "memory.swap.max").write_text("0")
        self.procs = str(self.path / "cgroup.procs")

    def remove(self) -> None:
        for _ in range(200):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:  # a process in it is still being reaped
                time.sleep(0.05)


def inside(cgroup: Cgroup, *command: str) -> list[str]:
    """``command`` run inside ``cgroup`` (it moves itself there, then execs: the same pid)."""
    return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', cgroup.procs, *command]


def until(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = condition()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture
def kernel():
    """Root, or skip (as tests/e2e/test_deaths.py's OOM kind); as root, /dev/kmsg and memory cgroups are
    required in CI (a cgroup that cannot be made fails the test there); the cgroups made are removed."""
    if os.geteuid() != 0:
        pytest.skip("not root: no memory cgroup of our own, no kernel log")
    if not os.access("/dev/kmsg", os.R_OK):
        if IN_CI:
            pytest.fail("/dev/kmsg is required in CI (running as root)")
        pytest.skip("/dev/kmsg cannot be read")
    made: list[Cgroup] = []
    procs: list[subprocess.Popen[bytes]] = []
    yield made, procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)
    for cg in made:
        cg.remove()


def failed(sidecar: Sidecar, run: str) -> dict[str, Any] | None:
    got = sidecar.client.get("/v1/alerts", params={"run": run}).json()["alerts"]
    return next((a for a in got if a["alert"] == "rank_failed" and a["state"] == "firing"), None)


def test_the_oom_killer_is_named_only_for_the_process_the_kernel_killed(machine_oom_lock, start_sidecar, tmp_path,
                                                                       kernel):
    made, procs = kernel
    sidecar = start_sidecar()
    job = uuid.uuid4().hex[:8]
    launch = [sys.executable, "-m", "trainhealth.launch", "--"]

    def rank(name: str, *command: str, rank: int = 1, world: int = 1) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINHEALTH_", "MASTER_", "TORCHELASTIC_"))}
        env.update({"PYTHONPATH": python_path(), "TRAINHEALTH_URL": sidecar.url, "TRAINHEALTH_RUN": f"{name}-{job}",
                    "RANK": str(rank), "WORLD_SIZE": str(world), "TRAINHEALTH_HEARTBEAT_SECONDS": "0.2",
                    "TRAINHEALTH_FLUSH_SECONDS": "0.2"})
        out = tmp_path / f"{name}{rank}"
        out.mkdir()
        with open(tmp_path / f"{name}{rank}.log", "wb") as log:
            proc = subprocess.Popen([*launch, *command], env=env, cwd=out, stderr=log)
        procs.append(proc)
        return proc

    delays: dict[str, float] = {}
    # 1. kill -9 the moment an unrelated process, in a cgroup of its own, is OOM-killed
    hog_cg = Cgroup("hog", 64 << 20)
    made.append(hog_cg)
    out = tmp_path / "kill1"
    victim = rank("kill", sys.executable, WORKER, "--out", str(out), "--die", "wait")
    pid = int(until(lambda: (out / "pid").exists() and (out / "pid").read_text(), 30, "the rank's pid"))
    until(lambda: sidecar.client.get(f"/v1/runs/kill-{job}").status_code == 200, 30, "the rank to report")
    before = machine_oom_kills()
    hog = subprocess.Popen(inside(hog_cg, sys.executable, "-c", HOG))
    procs.append(hog)
    assert hog.wait(30) == -signal.SIGKILL  # the OOM killer's
    os.kill(pid, signal.SIGKILL)
    killed = time.time()
    assert victim.wait(30) == -signal.SIGKILL
    after = machine_oom_kills()
    assert before is not None and after is not None and after > before  # what the old rule took for this rank's
    alert = until(lambda: failed(sidecar, f"kill-{job}"), 30, "rank_failed for the kill")
    delays["kill -9 beside an OOM kill: alert"] = time.time() - killed
    delays["kill -9 beside an OOM kill: launcher's verdict"] = alert["time"] - killed
    assert (alert["cause"], alert["signal"], alert["oom_killed"]) == ("signal", "SIGKILL", False), alert
    assert alert["summary"].startswith("rank 1 died at step "), alert["summary"]
    assert ": killed by SIGKILL (not the OOM killer, per the kernel log: a user, the scheduler or a watchdog)" \
        in alert["summary"], alert["summary"]

    # 2. the rank moves itself into a small memory cgroup (the launcher stays outside) and is OOM-killed
    cg = Cgroup("rank", LIMIT)
    made.append(cg)
    out = tmp_path / "oom1"
    oom = rank("oom", *inside(cg, sys.executable, WORKER, "--out", str(out), "--die", "oom", "--after", "3"))
    assert oom.wait(60) == -signal.SIGKILL
    dying = float((out / "dying").read_text())
    alert = until(lambda: failed(sidecar, f"oom-{job}"), 30, "rank_failed for the OOM kill")
    delays["OOM kill: alert"] = time.time() - dying  # from its first allocation on
    assert (alert["cause"], alert["signal"], alert["oom_killed"]) == ("oom_killer", "SIGKILL", True), alert
    assert alert["summary"].startswith("rank 1 died at step 3: killed by the kernel's OOM killer at "), alert["summary"]
    assert alert["summary"].endswith(" of its 160 MiB limit (SIGKILL, per the kernel log)"), alert["summary"]

    # 3. its child is OOM-killed in that cgroup; the rank fails with PyTorch's words (rank 0 trains on: the run
    # stays open, so the launcher's word refreshes the alert the client's exception raised)
    rank("child", sys.executable, WORKER, "--out", ".", "--die", "wait", rank=0, world=2)
    withchild = rank("child", sys.executable, "-c", WITH_CHILD, cg.procs, HOG, world=2)
    assert withchild.wait(60) == 1
    # the client's exception first, then the launcher's word refreshes it in place
    alert = until(lambda: (a := failed(sidecar, f"child-{job}")) and a["exit_code"] == 1 and a, 30,
                  "rank_failed with the launcher's word")
    assert (alert["cause"], alert["oom_killed"], alert["error_type"]) == ("oom_killer", False, "RuntimeError"), alert
    child = int(alert["error_message"].split("(pid ")[1].split(")")[0])
    assert alert["summary"].startswith(
        f"rank 1 died at step 1: RuntimeError: DataLoader worker (pid {child}) is killed by signal: Killed. (its child "
        f"process {child} (python"), alert["summary"]
    assert ") was killed by the kernel's OOM killer at " in alert["summary"], alert["summary"]
    assert alert["summary"].endswith(" of its 160 MiB limit (per the kernel log)); rank 0 still finishes steps"), \
        alert["summary"]
    print(f"named after (s): {delays}")
    assert all(d < NAMED_WITHIN for d in delays.values()), delays


# the launcher with a kernel log it cannot read (as without root or CAP_SYSLOG, or in a container without
# /dev/kmsg): it prints the end record it would send
BLIND = """
import json, sys
from trainhealth.trainer.launch import RankWatcher
from trainhealth.trainer.transport import Result
class Print:
    def send(self, records, batch_id):
        print(json.dumps(records[0]), flush=True)
        return Result("ok")
    def close(self):
        pass
w = RankWatcher(sys.argv[1:], sender=Print(), kmsg="/nonexistent/kmsg")
w.start()
w.wait()
"""


def test_without_the_kernel_log_only_the_jobs_own_cgroup_proves_an_oom_kill(machine_oom_lock, tmp_path, kernel):
    """The fallback: the rank's own limited cgroup's count proves an OOM kill (the launcher and the rank in
    it, as in a container); the machine's count that rose while a rank was kill -9ed proves nothing."""
    made, procs = kernel
    env = {**os.environ, "PYTHONPATH": python_path(), "TRAINHEALTH_RUN": "blind", "RANK": "1"}

    def blind(*command: str, cgroup: Cgroup | None = None) -> subprocess.Popen[str]:
        args = [sys.executable, "-c", BLIND, *command]
        proc = subprocess.Popen(inside(cgroup, *args) if cgroup else args, env=env, cwd=tmp_path,
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)  # type: ignore[arg-type]
        return proc

    cg = Cgroup("blind", LIMIT)
    made.append(cg)
    oom = blind(sys.executable, "-c", HOG, cgroup=cg)
    end = json.loads(oom.communicate(timeout=60)[0])
    assert (end["signal"], end["oom_killed"], end["oom_check"], end["host_mem_limit_bytes"]) == (
        "SIGKILL", True, "cgroup_count", LIMIT), end

    hog_cg = Cgroup("blind-hog", 64 << 20)
    made.append(hog_cg)
    victim = blind("sleep", "60")
    rank = until(lambda: [c for c in psutil.Process(victim.pid).children() if c.name() == "sleep"], 30, "the rank")[0]
    hog = subprocess.Popen(inside(hog_cg, sys.executable, "-c", HOG))
    procs.append(hog)  # type: ignore[arg-type]
    assert hog.wait(30) == -signal.SIGKILL
    rank.kill()
    end = json.loads(victim.communicate(timeout=30)[0])
    assert (end["signal"], end["oom_check"], end["pid"]) == ("SIGKILL", "unproven", rank.pid), end
    assert "oom_killed" not in end
    assert re.fullmatch(r"the kernel log cannot be read \(/nonexistent/kmsg: No such file or directory\) and the only "
                        r"OOM-kill count is the machine's, which rose by [1-9]\d* while it ran: any process on the "
                        r"machine", end["oom_doubt"]), end
