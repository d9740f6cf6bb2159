"""How ranks end, end to end: a user's DDP loop (tests/e2e/loop_worker.py: the two lines, no ``tm.end()``)
under torchrun on gloo, a real sidecar. A clean end raises no alert; a crash reaches the sidecar quoted;
a NaN with ``stop_on`` stops every rank after the same step (2 and 4 ranks, one of them hearing late
through a proxy that delays the sidecar's answers; one hearing the stop only after checking it: both stop
later, together), and only for an alert in ``stop_on``. The reference
trainer's ``--stop-on`` does the same."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import ROOT, Sidecar

pytest.importorskip("torch")

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

CONFIG = """
[detectors.rank_stalled]
floor_seconds = 3.0
startup_seconds = 20.0
silence_floor_seconds = 2.0
"""
FAST = {"TRAINHEALTH_HEARTBEAT_SECONDS": "0.2", "TRAINHEALTH_FLUSH_SECONDS": "0.2"}
WORKER = str(ROOT / "tests" / "e2e" / "loop_worker.py")


class Launch:
    """torchrun of the worker (or of the reference trainer); always killed at the end, launcher and ranks."""

    def __init__(self, sidecar: Sidecar, tmp: Path, args: tuple[str, ...], ranks: int, module: bool) -> None:
        self.sidecar = sidecar
        self.run = f"ends-{uuid.uuid4().hex[:10]}"
        self.out = tmp / self.run
        self.out.mkdir()
        target = ["-m", "trainhealth.trainer", *args] if module else [WORKER, "--out", str(self.out), *args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINHEALTH_")}
        env.update({"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TRAINHEALTH_URL": sidecar.url,
                    "TRAINHEALTH_RUN": self.run, **FAST})
        self.log_path = tmp / f"{self.run}.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
                 *target], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.family: dict[int, psutil.Process] = {}

    def log(self) -> str:
        return self.log_path.read_text()[-5000:]

    def wait(self, timeout: float = 90) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, f"torchrun still running after {timeout} s (a hang):\n{self.log()}"
            try:
                for p in psutil.Process(self.proc.pid).children(recursive=True):
                    self.family.setdefault(p.pid, p)
            except psutil.NoSuchProcess:
                pass
            time.sleep(0.1)
        return self.proc.returncode

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        for p in self.family.values():
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass

    def results(self) -> dict[int, dict[str, Any]]:
        return {int(p.stem[4:]): json.loads(p.read_text()) for p in self.out.glob("rank*.json")}

    def alerts(self) -> list[dict[str, Any]]:
        return self.sidecar.client.get("/v1/alerts", params={"run": self.run}).json()["alerts"][::-1]

    def records(self, tmp: Path) -> list[dict[str, Any]]:
        path = tmp / "records" / f"{self.run}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def sidecar(start_sidecar) -> Sidecar:
    return start_sidecar(config=CONFIG, record=True)


@pytest.fixture
def launch(sidecar: Sidecar, tmp_path: Path):
    started: list[Launch] = []

    def start(*args: str, ranks: int = 2, module: bool = False) -> Launch:
        job = Launch(sidecar, tmp_path, args, ranks, module)
        started.append(job)
        return job

    try:
        yield start
    finally:
        for job in started:
            job.kill()


class DelayingProxy:
    """TCP proxy to the sidecar that holds every byte coming back for ``delay`` seconds: a client behind it
    hears of alerts (in answers and in its long poll) that much later than the others."""

    def __init__(self, target: str, delay: float) -> None:
        host, port = target.removeprefix("http://").split(":")
        self.target, self.delay = (host, int(port)), delay
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(started,), daemon=True)
        self.thread.start()
        assert started.wait(10)

    def _serve(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        started.set()
        self.loop.run_forever()
        server.close()
        tasks = asyncio.all_tasks(self.loop)
        for task in tasks:
            task.cancel()
        self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self.loop.run_until_complete(server.wait_closed())
        self.loop.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, delay: float) -> None:
            try:
                while data := await src.read(65536):
                    if delay:
                        await asyncio.sleep(delay)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        try:
            await asyncio.gather(pipe(reader, up_writer, 0.0), pipe(up_reader, writer, self.delay))
        finally:
            writer.close()
            up_writer.close()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


# -----------------------------------------------------------------------------------------------------------

def test_a_clean_end_without_tm_end_raises_no_alert(launch, tmp_path):
    job = launch("--steps", "40", "--step-sleep", "0.02")
    assert job.wait() == 0, job.log()
    time.sleep(4.0)  # past the 2 s silence floor and the timer's ticks: a missing end would be a stall now
    assert job.alerts() == []
    status = job.sidecar.client.get(f"/v1/runs/{job.run}").json()
    assert (status["step"], status["ended"]) == (40, True)
    ends = [(r["rank"], r["status"], r["step"]) for r in job.records(tmp_path) if r["type"] == "end"]
    assert sorted(ends) == [(0, "completed", 40), (1, "completed", 40)]


def test_a_crash_reaches_the_sidecar_quoted(launch, tmp_path):
    job = launch("--steps", "200", "--step-sleep", "0.02", "--crash-rank", "1", "--crash-step", "20")
    assert job.wait() != 0, job.log()
    ends = {r["rank"]: r for r in job.records(tmp_path) if r["type"] == "end"}
    assert (ends[1]["status"], ends[1]["step"]) == ("failed", 19)
    assert ends[1]["error"]["type"] == "RuntimeError"
    assert ends[1]["error"]["message"] == "CUDA error: unspecified launch failure"
    assert "loop_worker.py" in ends[1]["error"]["traceback"]
    # rank 0 waited in the all-reduce until torchrun stopped it: never a completed end
    assert ends.get(0, {}).get("status") != "completed"


@pytest.mark.parametrize(("ranks", "late"), [(2, -1), (2, 1), (4, 2)])
def test_nan_with_stop_on_stops_every_rank_after_the_same_step(launch, sidecar, tmp_path, ranks, late):
    nan_step = 30
    proxy = DelayingProxy(sidecar.url, 0.03) if late >= 0 else None
    try:
        extra = ("--late-rank", str(late), "--late-url", proxy.url) if proxy else ()
        # 0.2 s steps: the stop lead is max(2 steps, 0.1 s) (monitor/stop_steps.py), so the late rank has 0.4 s
        # to hear the stop, not 0.1 s as at the worker's default 50 ms steps (missed on a loaded machine)
        job = launch("--steps", "200", "--step-sleep", "0.2", "--stop-on", "nan_divergence", "--nan-rank", "1",
                     "--nan-step", str(nan_step), *extra, ranks=ranks)
        assert job.wait() != 0, job.log()  # exit 3 from every rank: torchrun reports the failure
    finally:
        if proxy:
            proxy.stop()
    results = job.results()
    assert sorted(results) == list(range(ranks)), job.log()
    stops = {r["stopped_at"] for r in results.values()}
    seen = f"{results}\n{sidecar.stderr_text()[-3000:]}"
    assert len(stops) == 1, seen  # the same step everywhere: nobody left in a collective
    [stop] = stops
    assert nan_step + 2 <= stop <= nan_step + 3, seen
    assert all(r["heard_at"] is not None and r["heard_at"] <= stop for r in results.values())
    assert all(r["stop_reason"]["alert"] == "nan_divergence" and r["stop_reason"]["first_step"] == nan_step
               for r in results.values())
    nan = [a for a in job.alerts() if a["alert"] == "nan_divergence" and a["state"] == "firing"]
    assert {a["step"] for a in nan} == {nan_step}


def test_a_rank_that_hears_the_stop_after_checking_it_is_not_stranded_every_rank_stops_later_together(
        launch, sidecar):
    """The partial miss (the lead's hang): rank 1 hears the stop step only after its loop checked it, rank 0 in
    time. Rank 0 used to leave after that step while rank 1 sat in the next step's DDP all-reduce; now rank 1's
    ack moves the stop at once, and both stop after the same later step."""
    nan_step = 30
    job = launch("--steps", "200", "--step-sleep", "0.05", "--stop-on", "nan_divergence", "--nan-rank", "1",
                 "--nan-step", str(nan_step), "--miss-rank", "1")
    assert job.wait() != 0, job.log()  # exit 3 from both ranks
    results = job.results()
    seen = f"{results}\n{job.log()}\n{sidecar.stderr_text()[-3000:]}"
    assert sorted(results) == [0, 1], seen  # a rank that stopped alone would have left the other to be killed
    stops = {r["stopped_at"] for r in results.values()}
    assert len(stops) == 1, seen
    view = sidecar.client.get(f"/v1/runs/{job.run}/watch", params={"version": 0, "timeout": 0}).json()
    stop = view["stops"]["nan_divergence"]
    assert (stop["step"], stop["confirmed"]) == (stops.pop(), True) and stop["moved"] >= 1, seen


def test_no_stop_for_an_alert_not_in_stop_on(launch):
    job = launch("--steps", "60", "--step-sleep", "0.02", "--stop-on", "gpu_oom,host_memory_leak",
                 "--nan-rank", "1", "--nan-step", "10")
    assert job.wait() == 0, job.log()
    results = job.results()
    assert [(r["stopped_at"], r["last_step"]) for r in results.values()] == [(None, 60), (None, 60)]
    assert any(a["alert"] == "nan_divergence" for a in job.alerts())  # it fired: not a stop reason here


def test_the_reference_trainer_stops_on_nan_in_step_and_exits_3(launch, tmp_path):
    job = launch("--steps", "200", "--step-sleep", "0.05", "--stop-on", "nan_divergence", "--inject", "nan-data",
                 "--inject-rank", "1", "--inject-step", "20", "--log-every", "1000", module=True)
    assert job.wait() != 0
    log = job.log()
    lines = [line for line in log.splitlines() if "stopping after step" in line]
    assert len(lines) == 2, log
    steps = {int(line.split("stopping after step ")[1].split(":")[0]) for line in lines}
    assert len(steps) == 1 and 22 <= steps.pop() <= 23, lines
    assert "exitcode: 3" in log or "exit code: 3" in log or "exitcode 3" in log, log
    samples = [r for r in job.records(tmp_path) if r["type"] == "sample"]
    assert max(r["step"] for r in samples) <= 23 and any(not math.isfinite(r["loss"]) for r in samples)
