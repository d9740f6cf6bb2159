"""Two jobs under one run name on one sidecar (issue 21): real client processes, a real sidecar.

Each job has 2 ranks with the environment torchrun's static rendezvous gives them (``TORCHELASTIC_RUN_ID``
"none", ``MASTER_ADDR``/``MASTER_PORT`` of their own job), the two lines only (``Telemetry()``,
``tm.record``: no ``tm.start()``), and a loss curve 10x apart: mixed, their records would page loss
spikes and restarts. The first job owns the name; the second's records are refused with one line (its
console, the ingest answer, one info alert), and no detector sees them: no other alert. The sidecar knows
each rank's host and pid from the batches alone.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from typing import Any

import pytest

from tests.conftest import ROOT, python_path

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

WORKER = str(ROOT / "tests" / "e2e" / "death_worker.py")


def test_two_jobs_under_one_run_name_never_mix(start_sidecar, tmp_path):
    sidecar = start_sidecar()
    started: list[tuple[str, int, subprocess.Popen[bytes]]] = []

    def job(name: str, port: int, loss: float, steps: int) -> None:
        for rank in (0, 1):
            out = tmp_path / f"{name}{rank}"
            out.mkdir()
            env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINHEALTH_", "MASTER_", "TORCHELASTIC"))}
            env.update({"PYTHONPATH": python_path(), "TRAINHEALTH_URL": sidecar.url, "TORCHELASTIC_RUN_ID": "none",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": "2",
                        "TRAINHEALTH_FLUSH_SECONDS": "0.2", "TRAINHEALTH_HEARTBEAT_SECONDS": "0.5"})
            with open(tmp_path / f"{name}{rank}.log", "wb") as log:
                proc = subprocess.Popen([sys.executable, WORKER, "--out", str(out), "--die", "none", "--steps",
                                         str(steps), "--step-sleep", "0.05", "--loss", str(loss)],
                                        env=env, cwd=tmp_path, stderr=log)
            started.append((name, rank, proc))

    def status() -> dict[str, Any]:
        got = sidecar.client.get("/v1/runs/none")
        return got.json() if got.status_code == 200 else {}

    try:
        job("a", 29511, 1.0, 10**9)  # trains until the end of the test
        deadline = time.monotonic() + 60
        while (status().get("min_step") or 0) < 3:  # job a owns the name before job b starts
            assert time.monotonic() < deadline, "job a did not train"
            time.sleep(0.05)
        job("b", 29522, 10.0, 60)
        for name, _, proc in started:
            if name == "b":
                assert proc.wait(60) == 0  # refused records do not trouble its training
        time.sleep(1.0)  # the timer's ticks over what came in
        view = status()
        metrics = sidecar.client.get("/metrics").text
        alerts = sidecar.client.get("/v1/alerts", params={"run": "none"}).json()["alerts"][::-1]
        assert all(proc.poll() is None for name, _, proc in started if name == "a")
    finally:
        for _, _, proc in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    a_pids = {rank: proc.pid for name, rank, proc in started if name == "a"}
    assert {r["rank"]: (r["pid"], r["host"] is not None) for r in view["rank_states"]} == \
        {q: (pid, True) for q, pid in a_pids.items()}  # host and pid without a start record
    assert not view["ended"]  # job b's clean ends were refused with the rest of its records
    assert re.search(r'^trainhealth_records_rejected_total\{reason="run_name_taken"\} (\d+)', metrics, re.M), metrics
    assert int(re.search(r'reason="run_name_taken"\} (\d+)', metrics).group(1)) >= 2 * 60  # all of job b's
    assert [(a["alert"], a["state"], a["severity"]) for a in alerts] == [("run_name_taken", "firing", "info")], \
        alerts
    taken = alerts[0]
    assert taken["summary"].startswith("run none is taken by another job (job ") and "): give each job its own " \
        "run name (TRAINHEALTH_RUN, or torchrun --rdzv-id); the records of job " in taken["summary"]
    assert taken["other_job"].endswith("/127.0.0.1:29522") and taken["job"].endswith("/127.0.0.1:29511")
    assert taken["other_pid"] in {proc.pid for name, _, proc in started if name == "b"}
    console = sidecar.stderr_text()
    assert console.count("give each job its own run name") == 1, console[-3000:]
    b_log = (tmp_path / "b0.log").read_text()
    assert 'dropped them: HTTP 409: {"error":"run none is taken by another job (job ' in b_log, b_log
    assert "give each job its own run name (TRAINHEALTH_RUN, or torchrun --rdzv-id)" in b_log, b_log
