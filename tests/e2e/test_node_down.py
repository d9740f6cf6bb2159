"""A node down, end to end: the reference trainer on two "hosts" (two torchrun agents, --nnodes 2, each
with TRAINHEALTH_NODE set so one machine stands for two), 2 ranks each, gloo on the CPU, a real sidecar.
node-b's agent and ranks are killed with SIGKILL at once; the sidecar raises ONE incident that names
node-b and its ranks, and lists node-a's ranks as what they did after it (waiting in a collective, or
failing with a collective error when the reset connection reaches them), without paging them.

On one machine the killed ranks' sockets are closed by the kernel, so node-a's collective fails at once
("Connection closed by peer") where a real dead node would leave it hanging; node-a's ranks report that
crash through tests/e2e/crash_report.py, standing in for the client's exception hook (issue 15). When one
of them fails first, node-a's torchrun agent stops the other with SIGTERM: if that comes before its own
error is reported, its client says so before it dies ("was stopped after them"; before the client did, it
went silent, after node-b, and was named as stopped by its launcher: tests/unit/test_incidents.py replays it).
The two-namespace bed (test_two_nodes.py) has a real node down, where nothing reaches node-a.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import ROOT, Sidecar

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

CONFIG = """
[detectors.rank_stalled]
floor_seconds = 3.0
startup_seconds = 30.0
silence_floor_seconds = 2.0
"""
FAST_CLIENT = {"TRAINHEALTH_HEARTBEAT_SECONDS": "0.2", "TRAINHEALTH_FLUSH_SECONDS": "0.2",
               "TRAINHEALTH_SAMPLE_SECONDS": "0.5"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Node:
    """One torchrun agent standing for one machine: ``--nnodes 2 --node_rank N``, 2 ranks."""

    def __init__(self, host: str, node_rank: int, port: int, run: str, sidecar: Sidecar, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINHEALTH_")}
        env.update({"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TRAINHEALTH_URL": sidecar.url,
                    "TRAINHEALTH_RUN": run, "TRAINHEALTH_NODE": host, **FAST_CLIENT})
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2",
               "--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
               "--max_restarts", "0", "-m", "tests.e2e.crash_report", "trainhealth.trainer",
               "--steps", "100000", "--step-sleep", "0.05", "--log-every", "100000", "--pg-timeout", "120"]
        self.log_path = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.family: dict[int, psutil.Process] = {}

    def watch(self) -> None:
        try:
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                self.family.setdefault(p.pid, p)
        except psutil.NoSuchProcess:
            pass

    def kill(self) -> None:
        """SIGKILL the agent and every rank at once: the machine is gone."""
        self.watch()
        procs = [psutil.Process(self.proc.pid)] if self.proc.poll() is None else []
        for p in [*procs, *self.family.values()]:
            try:
                p.send_signal(signal.SIGKILL)  # psutil checks it is still the process it saw
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(10)
        psutil.wait_procs(list(self.family.values()), timeout=10)

    def log(self) -> str:
        return self.log_path.read_text()[-3000:]


def test_a_node_down_is_one_incident_naming_the_host(start_sidecar, tmp_path: Path) -> None:
    sidecar = start_sidecar(config=CONFIG, record=True)
    run = f"node-down-{uuid.uuid4().hex[:8]}"
    port = free_port()
    nodes = [Node(host, i, port, run, sidecar, tmp_path / f"{host}.log")
             for i, host in enumerate(("node-a", "node-b"))]
    try:
        def status() -> dict[str, Any]:
            answer = sidecar.client.get(f"/v1/runs/{run}")
            return answer.json() if answer.status_code == 200 else {}

        deadline = time.monotonic() + 90
        while (status().get("min_step") or 0) < 20:  # every rank trains
            for n in nodes:
                n.watch()
                assert n.proc.poll() is None, n.log()
            assert time.monotonic() < deadline, f"the job did not train:\n{nodes[0].log()}\n{nodes[1].log()}"
            time.sleep(0.2)
        hosts = {r["rank"]: r["host"] for r in status()["rank_states"]}
        assert hosts == {0: "node-a", 1: "node-a", 2: "node-b", 3: "node-b"}

        # what the sidecar said before (its detectors may judge the job's first steps)
        before = {a["alert"] for a in sidecar.client.get("/v1/alerts", params={"run": run}).json()["alerts"]}
        assert "rank_stalled" not in before

        def new_alerts() -> list[dict[str, Any]]:
            every = sidecar.client.get("/v1/alerts", params={"run": run}).json()["alerts"]
            return [a for a in every if a["alert"] not in before]

        nodes[1].kill()  # node-b goes down
        killed_at = time.time()
        deadline = time.monotonic() + 60
        while True:
            alerts = new_alerts()
            if alerts:
                break
            assert time.monotonic() < deadline, f"no incident:\n{nodes[0].log()}"
            time.sleep(0.2)
        time.sleep(4)  # node-a's ranks cross their limits too: still one alert, refreshed in place
        alerts = new_alerts()
        assert [(a["alert"], a["state"], a["rank"]) for a in alerts] == [("rank_stalled", "firing", None)], \
            (alerts, nodes[0].log())
        (a,) = alerts
        assert (a["host"], a["root_ranks"], a["first_rank"], a["reason"]) == ("node-b", [2, 3], 2, "silent")
        # (SIGKILL loses what node-b's clients had not sent yet: their last steps may differ by a few)
        assert re.match(rf"node-b went silent: ranks 2-3 stopped after steps? {a['step']}(-\d+)? at the same "
                        rf"moment \(node down or network partition\); (ranks 0-1 on node-a (wait in a collective|"
                        rf"failed after them with a collective error|were stopped after them)|rank [01] on node-a "
                        rf"(waits in a collective|failed after them with a collective error|was stopped after them))",
                        a["summary"]), a["summary"]
        # waiting, crashed after it, or stopped by node-a's agent after its neighbour crashed
        assert sorted(a["waiting_ranks"] + a["failed_ranks"] + a["stopped_ranks"]) == [0, 1]
        assert a["time"] - killed_at < 5  # the silence limit (2 s) after node-b's last record
        findings = status()["findings"]["rank_stalled"]
        assert (findings["host"], findings["root_ranks"]) == ("node-b", [2, 3])
    finally:
        for n in nodes:
            n.kill()
