"""Deaths named in seconds (issue 21), real processes and a real sidecar.

Rank 0 trains on for the whole test while rank 1, run under ``python -m trainhealth.launch``, dies five
ways in turn: an abort after the NCCL watchdog's text, a segfault, SIGKILL from outside, ``os._exit(13)``,
and the kernel's OOM killer in a small memory cgroup (as root: v1 or v2). Each death is one
``rank_failed`` alert within 5 s, saying how (signal or exit code, the runtime's last words, the OOM
kill), and the next rank 1 (a new process: its samples) resolves it. Rank 0 is never paged.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import IN_CI, ROOT, Sidecar, python_path

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

WORKER = str(ROOT / "tests" / "e2e" / "death_worker.py")
FAST = {"TRAINHEALTH_HEARTBEAT_SECONDS": "0.2", "TRAINHEALTH_FLUSH_SECONDS": "0.2"}
NAMED_WITHIN = 5.0
CGROUP_LIMIT = 160 << 20


def env_for(sidecar: Sidecar, run: str, rank: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINHEALTH_", "MASTER_", "TORCHELASTIC_"))}
    env.update({"PYTHONPATH": python_path(), "TRAINHEALTH_URL": sidecar.url, "TRAINHEALTH_RUN": run,
                "RANK": str(rank), "WORLD_SIZE": "2", **FAST})
    return env


def until(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = condition()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def alerts(sidecar: Sidecar, run: str) -> list[dict[str, Any]]:
    return sidecar.client.get("/v1/alerts", params={"run": run}).json()["alerts"][::-1]


class MemoryCgroup:
    """A memory cgroup of its own (v1 or v2) with a small limit; removed at the end."""

    def __init__(self, limit: int) -> None:
        name = f"trainhealth-deaths-{os.getpid()}"
        v1 = Path("/sys/fs/cgroup/memory")
        self.path = v1 / name if v1.is_dir() else Path("/sys/fs/cgroup") / name
        self.path.mkdir()
        if v1.is_dir():
            (self.path / "memory.limit_in_bytes").write_text(str(limit))
            swap = self.path / "memory.memsw.limit_in_bytes"
            if swap.exists():
                swap.write_text(str(limit))
        else:
            (self.path / "memory.max").write_text(str(limit))
            (self.path / "memory.swap.max").write_text("0")

    def procs(self) -> str:
        return str(self.path / "cgroup.procs")

    def remove(self) -> None:
        for _ in range(100):
            try:
                self.path.rmdir()
                return
            except OSError:  # a process still in it is being reaped
                time.sleep(0.05)


def memory_cgroup() -> MemoryCgroup | None:
    """A cgroup of our own needs root: without it the OOM kind is left out (said on stdout); as root, a
    cgroup that cannot be made fails the test in CI."""
    if os.geteuid() != 0:
        print("not root: no memory cgroup of our own, the OOM kill is left out")
        return None
    try:
        return MemoryCgroup(CGROUP_LIMIT)
    except OSError as exc:
        if IN_CI:
            pytest.fail(f"a memory cgroup is required in CI (running as root): {exc}")
        print(f"no memory cgroup ({exc}): the OOM kill is left out")
        return None


@pytest.fixture
def procs():
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(10)


def test_each_death_is_named_within_seconds_with_its_cause(machine_oom_lock, start_sidecar, tmp_path, procs):
    sidecar = start_sidecar()
    run = f"deaths-{uuid.uuid4().hex[:8]}"
    out0 = tmp_path / "rank0"
    out0.mkdir()
    launch = [sys.executable, "-m", "trainhealth.launch", "--", sys.executable, WORKER]
    procs.append(subprocess.Popen([*launch, "--out", str(out0), "--die", "wait"], env=env_for(sidecar, run, 0),
                                  cwd=tmp_path))
    status = lambda: sidecar.client.get(f"/v1/runs/{run}").json()  # noqa: E731
    until(lambda: sidecar.client.get(f"/v1/runs/{run}").status_code == 200 and status()["step"] >= 3, 60,
          "rank 0 to train")
    cgroup = memory_cgroup()
    kinds = ["abort", "segv", "kill", "exit13"] + (["oom"] if cgroup is not None else [])
    delays: dict[str, float] = {}
    try:
        for i, kind in enumerate(kinds):
            out = tmp_path / kind
            out.mkdir()
            args = [*launch, "--out", str(out), "--die", "wait" if kind == "kill" else kind, "--after", "4"]
            if kind == "oom":
                assert cgroup is not None
                args = ["sh", "-c", f'echo $$ > {cgroup.procs()} && exec "$@"', "sh", *args]
            with open(tmp_path / f"{kind}.log", "wb") as log:
                proc = subprocess.Popen(args, env=env_for(sidecar, run, 1), cwd=tmp_path, stderr=log)
            procs.append(proc)
            if kind == "kill":
                pid = int(until(lambda o=out: (o / "pid").exists() and (o / "pid").read_text(), 30, "rank 1's pid"))
                until(lambda n=i: sum(a["state"] == "resolved" for a in alerts(sidecar, run)) == n, 30,
                      "the new rank 1 to train (its samples resolve the last death)")
                dying = time.time()
                os.kill(pid, signal.SIGKILL)
            else:
                dying = float(until(lambda o=out: (o / "dying").exists() and (o / "dying").read_text(), 60,
                                    f"rank 1 to die ({kind})"))
            fired = until(lambda n=i + 1: [a for a in alerts(sidecar, run) if a["alert"] == "rank_failed"
                                           and a["state"] == "firing"][n - 1:], 30, f"rank_failed for {kind}")[-1]
            delays[kind] = time.time() - dying
            assert delays[kind] < NAMED_WITHIN, (kind, delays, fired)
            assert proc.wait(30) != 0
            assert fired["first_rank"] == 1 and fired["running_ranks"] == [0], fired
            say = fired["summary"]
            if kind == "abort":
                assert (fired["cause"], fired["signal"], fired["exit_code"]) == ("signal", "SIGABRT", None)
                assert say.startswith("rank 1 died at step 4: aborted (SIGABRT): terminate called after throwing an "
                                      "instance of 'c10::DistBackendError': [PG 0 Rank 1] Watchdog caught collective "
                                      "operation timeout"), say
                assert "what():  [PG 0 Rank 1] Watchdog caught" in fired["stderr_tail"]
            elif kind == "segv":
                assert (fired["cause"], fired["signal"]) == ("signal", "SIGSEGV")
                assert say.startswith("rank 1 died at step 4: killed by SIGSEGV (segmentation fault): Fatal Python "
                                      "error: Segmentation fault (File "), say
                assert "death_worker.py" in fired["stderr_tail"]  # faulthandler's Python stack
            elif kind == "kill":
                assert (fired["cause"], fired["signal"], fired["oom_killed"]) == ("signal", "SIGKILL", False)
                assert say.startswith("rank 1 died at step "), say
                assert "killed by SIGKILL (not the OOM killer, per the kernel log: a user, the scheduler or a " \
                    "watchdog)" in say  # tests/e2e/test_oom_cause.py: even while another process is OOM-killed
            elif kind == "exit13":
                assert (fired["cause"], fired["signal"], fired["exit_code"]) == ("exit", None, 13)
                assert say.startswith("rank 1 died at step 4: exited with code 13 without reporting an exception")
            else:
                assert (fired["cause"], fired["signal"], fired["oom_killed"]) == ("oom_killer", "SIGKILL", True)
                assert say.startswith("rank 1 died at step 4: killed by the kernel's OOM killer at "), say
                assert say.endswith(" of its 160 MiB limit (SIGKILL, per the kernel log); rank 0 still finishes "
                                    "steps"), say
    finally:
        if cgroup is not None:
            cgroup.remove()
    print(f"named after (s): {delays}")
    # rank 0 trained on throughout and was never paged; each death was one incident, resolved by the next
    # rank 1's samples (the last one stays open)
    seen = [(a["alert"], a["state"]) for a in alerts(sidecar, run)]
    n = len(kinds)
    assert seen == [("rank_failed", "firing"), ("rank_failed", "resolved")] * (n - 1) + [("rank_failed", "firing")], \
        seen
    assert psutil.Process(procs[0].pid).is_running() and procs[0].poll() is None


LOOP = str(ROOT / "tests" / "e2e" / "loop_worker.py")


@pytest.mark.parametrize("watched, held", [(True, False), (False, False), (False, True)],
                         ids=["under-trainhealth.launch", "bare", "bare-survivor-blocked"])
def test_a_ddp_rank_killed_is_named_within_seconds(request, start_sidecar, tmp_path, procs, watched, held):
    """torchrun, 2 ranks of a DDP loop on gloo; rank 1 is SIGKILLed. Under the launcher: rank_failed says
    SIGKILL. Bare, whichever comes first: rank 0's collective fails ("Connection closed by peer": its client
    sends the exception), or torchrun's agent sees rank 1's death and SIGTERMs rank 0 (its client sends an
    end saying SIGTERM before it dies of it; the normal case with NCCL). Either way rank 0's end is a
    consequence and rank 1, quiet since before it, is named by rank_stalled as exited without an end record,
    at once rather than after the silence limit. "bare-survivor-blocked": rank 0 is blocked for good in a C
    call (as in an NCCL collective) when rank 1 dies: no collective error can come, the agent's SIGTERM is
    the only word, and the client's thread sends it while the training thread stays blocked."""
    if watched:  # the launcher tells a SIGKILL from an OOM kill (the bare ranks have nobody to: no lock to wait on)
        request.getfixturevalue("machine_oom_lock")
    pytest.importorskip("torch")
    sidecar = start_sidecar()
    run = f"ddp-kill-{uuid.uuid4().hex[:8]}"
    env = env_for(sidecar, run, 0)
    del env["RANK"], env["WORLD_SIZE"]
    env["OMP_NUM_THREADS"] = "1"
    target = ["-m", "trainhealth.launch", sys.executable, LOOP] if watched else [LOOP]
    if held:
        target += ["--hold-rank", "0", "--hold-step", "8"]
    with open(tmp_path / "torchrun.log", "wb") as log:
        torchrun = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                     "2", *target, "--out", str(tmp_path), "--steps", "100000", "--step-sleep", "0.05"],
                                    env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    procs.append(torchrun)
    status = lambda: sidecar.client.get(f"/v1/runs/{run}").json()  # noqa: E731

    def trains() -> bool:
        assert torchrun.poll() is None, (tmp_path / "torchrun.log").read_text()[-3000:]
        got = sidecar.client.get(f"/v1/runs/{run}")
        return got.status_code == 200 and (status().get("min_step") or 0) >= 5

    try:
        until(trains, 90, "both ranks to train")

        def rank1() -> psutil.Process | None:
            for p in psutil.Process(torchrun.pid).children(recursive=True):
                try:
                    line = p.cmdline()
                    if p.environ().get("RANK") == "1" and LOOP in line and "trainhealth.launch" not in line:
                        return p
                except psutil.Error:
                    pass
            return None

        victim = until(rank1, 10, "rank 1's process")
        if held:
            until(lambda: (tmp_path / "held").exists(), 30, "rank 0 to block")
        killed = time.time()
        victim.kill()
        fired = until(lambda: [a for a in alerts(sidecar, run) if a["state"] == "firing"], 30, "an alert")[0]
        delay = time.time() - killed
        print(f"named after {delay:.2f} s: {fired['summary']}")
        assert delay < NAMED_WITHIN, (delay, fired)
        assert fired["first_rank"] == 1 and fired["root_ranks"] == [1], fired
        if watched:
            assert (fired["alert"], fired["cause"], fired["signal"]) == ("rank_failed", "signal", "SIGKILL"), fired
            assert "killed by SIGKILL" in fired["summary"]
        else:
            assert (fired["alert"], fired["reason"]) == ("rank_stalled", "silent"), fired
            assert fired["summary"].startswith("rank 1 exited without an end record after step"), fired["summary"]
            assert ("; rank 0 failed after it with a collective error (" in fired["summary"]
                    or "; rank 0 was stopped after it (stopped by SIGTERM (asked to stop" in fired["summary"]), \
                fired["summary"]
            assert fired["failed_ranks"] == [0], fired
            if held:
                assert "; rank 0 was stopped after it (stopped by SIGTERM" in fired["summary"], fired["summary"]
                assert torchrun.wait(60) != 0
        until(lambda: torchrun.poll() is not None or all(r["ended"] for r in status()["rank_states"]), 60,
              "rank 0's end")
        time.sleep(1.5)  # the timer's ticks: still the one incident
        assert [(a["alert"], a["state"]) for a in alerts(sidecar, run) if a["state"] == "firing"] == \
            [(fired["alert"], "firing")], alerts(sidecar, run)
    finally:
        if torchrun.poll() is None:
            os.killpg(torchrun.pid, signal.SIGKILL)
