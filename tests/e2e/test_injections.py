"""Every fault of the reference trainer, end to end: ``python -m trainhealth.trainer`` under torchrun (2 ranks,
gloo on the CPU) sends telemetry to a real sidecar, and each injection raises the expected alert
naming the injected rank; a healthy run raises nothing at all.

The sidecar runs with small liveness thresholds (CONFIG) so a hang or a death is reported within
seconds; the healthy run uses the same thresholds and must stay quiet under them. The client sends
every 0.2 s (FAST_CLIENT). ``Job`` launches torchrun and always kills what it started, launcher and
ranks (torchrun gives every rank a session of its own, so its process group alone is not enough).
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil
import pytest

from tests.conftest import ROOT, Sidecar, python_path

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

CONFIG = """
[detectors.rank_stalled]
floor_seconds = 3.0
startup_seconds = 20.0
silence_floor_seconds = 2.0

# minutes and hours scaled down to seconds: half-second buckets, a 2-4 s lookback, 30 MB of growth; the
# machine-level forecast (available memory of this shared box) is switched off with a tiny horizon
[detectors.host_memory_leak]
bucket_seconds = 0.5
window_seconds = 4.0
min_window_seconds = 2.0
floor_seconds = 0.5
warmup_seconds = 1.0
min_growth_mb = 30.0
machine_horizon_hours = 0.0001
"""
FAST_CLIENT = {"TRAINHEALTH_HEARTBEAT_SECONDS": "0.2", "TRAINHEALTH_FLUSH_SECONDS": "0.2",
               "TRAINHEALTH_SAMPLE_SECONDS": "0.2"}
INJECTED = 1  # the rank every fault is injected on


class Job:
    """A torchrun launch of ``python -m trainhealth.trainer``; its output goes to ``log_path``."""

    def __init__(self, sidecar: Sidecar, log_path: Path, args: tuple[str, ...], env: dict[str, str]) -> None:
        self.sidecar = sidecar
        self.run = f"e2e-{uuid.uuid4().hex[:12]}"
        self.log_path = log_path
        environ = {k: v for k, v in os.environ.items() if not k.startswith("TRAINHEALTH_")}
        environ.update({"PYTHONPATH": python_path(), "OMP_NUM_THREADS": "1", "TRAINHEALTH_URL": sidecar.url,
                        "TRAINHEALTH_RUN": self.run, **FAST_CLIENT, **env})
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "trainhealth.trainer", "--log-every", "1000", *args]
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=environ, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.family: dict[int, psutil.Process] = {}  # the launcher's descendants seen so far

    def log(self) -> str:
        return self.log_path.read_text()[-4000:]

    def watch(self) -> None:
        """Note the ranks (and their children) while the launcher is there to find them by."""
        try:
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                self.family.setdefault(p.pid, p)
        except psutil.NoSuchProcess:
            pass

    def wait(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, f"torchrun still running after {timeout} s:\n{self.log()}"
            self.watch()
            time.sleep(0.1)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the launcher's process group, then every rank it started (each in its own session)."""
        self.watch()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        for p in self.family.values():
            try:
                p.kill()  # psutil checks the process is still the one it saw (no pid reuse)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(list(self.family.values()), timeout=10)

    # -- what the sidecar saw --------------------------------------------------------------------------
    def alerts(self) -> list[dict[str, Any]]:
        """This run's alert transitions, oldest first."""
        answer = self.sidecar.client.get("/v1/alerts", params={"run": self.run})
        assert answer.status_code == 200, answer.text
        return answer.json()["alerts"][::-1]

    def status(self) -> dict[str, Any]:
        answer = self.sidecar.client.get(f"/v1/runs/{self.run}")
        assert answer.status_code == 200, answer.text
        return answer.json()

    def wait_for(self, done: Callable[[list[dict[str, Any]]], bool], timeout: float = 60) -> list[dict[str, Any]]:
        """Poll this run's alert transitions until ``done(alerts)``; fail with the log after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            self.watch()
            alerts = self.alerts()
            if done(alerts):
                return alerts
            assert time.monotonic() < deadline, (
                f"no expected alert after {timeout} s; got {[(a['alert'], a['state'], a['rank']) for a in alerts]}"
                f"\n{self.log()}")
            time.sleep(0.2)


@pytest.fixture
def sidecar(start_sidecar) -> Sidecar:
    """The real sidecar with CONFIG's thresholds and the flight recorder on (tests read what it got)."""
    return start_sidecar(config=CONFIG, record=True)


@pytest.fixture
def launch(sidecar: Sidecar, tmp_path: Path) -> Iterator[Callable[..., Job]]:
    """launch(*trainer_args, env=...) -> Job; every job is killed at teardown, passed or failed."""
    jobs: list[Job] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Job:
        job = Job(sidecar, tmp_path / f"torchrun{len(jobs)}.log", args, env or {})
        jobs.append(job)
        return job

    try:
        yield start
    finally:
        for job in jobs:
            job.kill()


def recorded(tmp_path: Path, job: Job) -> list[dict[str, Any]]:
    """The records the sidecar accepted for this run (its flight recorder)."""
    path = tmp_path / "records" / f"{job.run}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def firing(alerts: list[dict[str, Any]], name: str) -> dict[int | None, dict[str, Any]]:
    return {a["rank"]: a for a in alerts if a["alert"] == name and a["state"] == "firing"}


# -----------------------------------------------------------------------------------------------------------

def test_healthy_run_raises_nothing_at_all(launch):
    # long enough (~5 s) for every detector to judge it under the small thresholds of CONFIG
    job = launch("--steps", "120", "--step-sleep", "0.03")
    assert job.wait() == 0, job.log()
    time.sleep(1.5)  # the sidecar's timer ticks every second: give liveness a chance to be wrong
    status = job.status()
    assert (status["step"], status["ranks"], status["ended"]) == (120, 2, True)  # it really ran
    assert job.alerts() == []
    assert "findings" not in status


def test_lr_unscaled_fires_lr_scaling_at_start_then_nan_divergence(launch, tmp_path):
    job = launch("--inject", "lr-unscaled", "--steps", "100", "--warmup-steps", "10")
    assert job.wait() == 0, job.log()  # NaN does not crash the trainer
    alerts = job.wait_for(lambda a: None in firing(a, "nan_divergence") and any(
        x["alert"] == "lr_scaling" and x["state"] == "resolved" for x in a), timeout=10)
    lr = [a for a in alerts if a["alert"] == "lr_scaling"]
    # the job ran to its end (the NaN does not crash it): once both ranks ended, the run's alerts resolved
    assert [(a["state"], a["rank"], a["severity"]) for a in lr] == [("firing", None, "critical"),
                                                                    ("resolved", None, "critical")]
    assert lr[0]["step"] == 0 and (lr[1]["resolved_by"], lr[1]["summary"]) == ("run_ended",
                                                                              "run ended completed at step 100")
    assert lr[0]["summary"].startswith("LR 0.02 is 4.0x the linear-scaling value 0.005 for total batch 4 "
                                       "(reference LR 0.02 for batch 16)")
    # the exact step: the first sample whose loss or grad norm was not finite, on any rank
    samples = [r for r in recorded(tmp_path, job) if r.get("type", "sample") == "sample"]
    bad = min(r["step"] for r in samples if not (math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])))
    assert bad > 10  # past the warmup: the LR really was too high, not the data
    nan = firing(alerts, "nan_divergence")
    assert [(rank, a["step"]) for rank, a in nan.items()] == [(None, bad)]  # one incident for the run
    assert job.status()["findings"]["nan_divergence"]["diverged_ranks"] == [0, 1]
    # order: lr_scaling was the first alert of the run, at the start, well before the NaN
    assert alerts[0] is lr[0]
    assert all(lr[0]["time"] < a["time"] and lr[0]["step"] < a["step"] for a in nan.values())
    assert all(a["severity"] == "critical" and "lower LR" in a["summary"] for a in nan.values())


def test_nan_data_on_rank_1_names_it_as_the_first_rank(launch):
    job = launch("--inject", "nan-data", "--inject-rank", str(INJECTED), "--inject-step", "8", "--steps", "12",
                 "--step-sleep", "0.02")
    assert job.wait() == 0, job.log()
    alerts = job.wait_for(lambda a: firing(a, "nan_divergence").get(None, {}).get("diverged_ranks") == 2,
                          timeout=10)
    (nan,) = firing(alerts, "nan_divergence").values()  # one incident, refreshed as rank 0's NaN came in
    # rank 1's loss went NaN on its own bad batch; rank 0 only got NaN through the all-reduced gradients
    assert (nan["step"], nan["cause"], nan["first_rank"], nan["first_step"]) == (8, "nonfinite_loss", 1, 8)
    assert (nan["root_ranks"], nan["received_ranks"], nan["shared_gradients"]) == ([1], [0], True)
    assert nan["summary"].startswith("loss became nan at step 8 on rank 1 (its own loss); restart from the last "
                                     "good checkpoint with a lower LR")
    assert nan["summary"].endswith("rank 0 got the NaN only through the shared gradients: check rank 1's batch, "
                                   "not theirs")
    findings = job.status()["findings"]["nan_divergence"]
    assert (findings["first_rank"], findings["first_step"], findings["first_cause"]) == (1, 8, "nonfinite_loss")
    assert findings["diverged_ranks"] == [0, 1]


def test_hang_on_rank_1_fires_rank_stalled_for_it(launch):
    # rank 1 hangs before step 6, in data loading (inside tm.phase("data")); rank 0 finishes its forward
    # pass and waits in the all-reduce of step 6 (phase "step"): both completed step 5 and keep heartbeating
    job = launch("--inject", "hang", "--inject-rank", str(INJECTED), "--inject-step", "6", "--hang-seconds", "0",
                 "--steps", "1000", "--step-sleep", "0.02")
    alerts = job.wait_for(lambda a: firing(a, "rank_stalled").get(None, {}).get("stuck_ranks") == [0, 1])
    assert job.proc.poll() is None, job.log()  # hanging, not dead
    (stalled,) = firing(alerts, "rank_stalled").values()  # one incident; rank 0 waits, listed, not paged
    assert (stalled["step"], stalled["reason"], stalled["heartbeats"]) == (5, "stuck", True)
    # the step cannot tell the hung rank from the one waiting for it; the heartbeats' phases can
    assert (stalled["first_rank"], stalled["waiting_ranks"], stalled["phase"]) == (INJECTED, [0], "data")
    assert re.search(r"rank 1 has been waiting for data since step 5 \(rank 1 for \d+ s\) while the other rank "
                     r"waits in the step's collectives: check its DataLoader/storage", stalled["summary"])
    phases = {r["rank"]: r["phase"] for r in job.status()["rank_states"]}
    assert phases == {0: "step", INJECTED: "data"}  # the status API shows them too
    assert [a["alert"] for a in alerts] == ["rank_stalled"]  # nothing else fired


def test_die_on_rank_1_fires_rank_stalled_for_it(launch, tmp_path):
    job = launch("--inject", "die", "--inject-rank", str(INJECTED), "--inject-step", "30", "--steps", "1000",
                 "--step-sleep", "0.05")
    def died(alerts: list[dict[str, Any]]) -> list[dict[str, Any]]:  # (a loaded box may pause a rank early on)
        return [a for a in alerts if a["alert"] == "rank_stalled" and a["state"] == "firing" and a["step"] >= 20]

    alerts = job.wait_for(lambda a: bool(died(a)))
    assert job.wait() != 0  # rank 1 exited with 13; gloo's reset connection took rank 0 down too
    (dead,) = died(alerts)
    # os._exit lost what rank 1's client had not sent yet: its alert is at the last step the sidecar got
    last = {rank: max(r["step"] for r in recorded(tmp_path, job) if r["rank"] == rank and "step" in r)
            for rank in (0, 1)}
    assert dead["reason"] == "silent" and dead["heartbeats"] is True
    # rank 0's collective failed after it: rank 0 went silent too but had got further, or (a client that
    # reports crashes) it ended with a collective error, a consequence; either way rank 1 is the root
    if last[INJECTED] < last[0] or 0 in dead["failed_ranks"]:
        assert (dead["first_rank"], dead["step"]) == (INJECTED, last[INJECTED])
        assert 20 <= dead["step"] <= 29
        assert re.search(rf"rank {INJECTED} (went silent after|stopped first \(at) step {dead['step']}",
                         dead["summary"])


def test_straggler_on_rank_1_fires_straggler_for_it(launch):
    job = launch("--inject", "straggler", "--inject-rank", str(INJECTED), "--inject-step", "3",
                 "--straggler-seconds", "0.1", "--steps", "1000", "--step-sleep", "0.02")
    alerts = job.wait_for(lambda a: bool(firing(a, "straggler")))
    slow = firing(alerts, "straggler")
    assert list(slow) == [INJECTED]
    a = slow[INJECTED]
    assert (a["signal"], a["severity"], a["window"]) == ("data_time", "warning", 20)
    assert 0.1 <= a["median_seconds"] < 0.2 and a["peers_median_seconds"] < 0.02
    assert a["step"] >= 3 + 20  # a full window of slow samples, then sustained
    assert [x["alert"] for x in alerts] == ["straggler"]


def test_host_leak_on_rank_1_fires_host_memory_leak_for_it(launch, tmp_path):
    job = launch("--inject", "host-leak", "--inject-rank", str(INJECTED), "--inject-step", "1", "--leak-mb", "2",
                 "--steps", "1000", "--step-sleep", "0.03")
    alerts = job.wait_for(lambda a: bool(firing(a, "host_memory_leak")))
    leak = firing(alerts, "host_memory_leak")
    assert list(leak) == [INJECTED]
    a = leak[INJECTED]
    assert a["scope"] == "process" and a["hours_to_exhaustion"] < 24
    assert a["severity"] == ("critical" if a["hours_to_exhaustion"] <= 2 else "warning")
    # the rate the trainer leaks at: 2 MiB per step at the steps per second the sidecar saw
    mine = [r for r in recorded(tmp_path, job) if r["rank"] == INJECTED and r.get("type", "sample") == "sample"]
    first, last = mine[0], mine[-1]
    leaked_per_hour = 2 * 2**20 * (last["step"] - first["step"]) / (last["time"] - first["time"]) * 3600 / 1e6
    assert 0.5 * leaked_per_hour < a["rate_mb_per_hour"] < 1.5 * leaked_per_hour, leaked_per_hour
    assert a["growth_mb"] >= 30 and a["summary"].startswith(f"host memory of rank {INJECTED} grows ")
    assert [x["alert"] for x in alerts] == ["host_memory_leak"]


@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="gpu-leak needs 2 CUDA GPUs (one per rank): on the CPU the trainer has no GPU memory "
                           "to leak, so gpu_oom_risk and gpu_oom cannot fire")
def test_gpu_leak_on_rank_1_fires_gpu_oom_risk_then_gpu_oom_for_it(launch):  # pragma: no cover - GPU only
    # Never run on the CPU-only machine this was written on.
    job = launch("--inject", "gpu-leak", "--inject-rank", str(INJECTED), "--inject-step", "1", "--leak-mb", "256",
                 "--steps", "100000", "--step-sleep", "0.01")
    alerts = job.wait_for(lambda a: INJECTED in firing(a, "gpu_oom"), timeout=90)
    risk, oom = firing(alerts, "gpu_oom_risk"), firing(alerts, "gpu_oom")
    assert list(oom) == [INJECTED] and list(risk) == [INJECTED]
    assert risk[INJECTED]["time"] <= oom[INJECTED]["time"]  # the warning came first
