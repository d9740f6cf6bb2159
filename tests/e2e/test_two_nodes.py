"""Two nodes for real (tests/twonodes.py): network namespaces on a bridge, host names node-0 and node-1,
torchrun ``--nnodes 2`` with a c10d rendezvous on node 0 and gloo over the veths, 2 ranks of the reference
trainer per node, real sidecars.

One sidecar per job: on node 0 (the rendezvous host), every rank sends to it through
``TRAINHEALTH_URL=http://{master}:PORT`` (MASTER_ADDR, from torchrun). One job: bad data on rank 2 (node-1)
at step 8 is named across nodes as the first NaN rank; then node-1 goes down (its link cut, every process in
it killed): one rank_stalled incident naming node-1 and its ranks within 15 s, node-0's ranks waiting in a
collective (nothing reaches them: no reset connection), and no other page.

The host names come from the nodes themselves (``socket.gethostname()`` in each UTS namespace): no
TRAINHEALTH_NODE is set. One bed per module (building it costs a second; each job ~20 s on 2 shared cores).
"""

from __future__ import annotations

import os
import re
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.conftest import IN_CI, Sidecar, python_path
from tests.twonodes import BedUnavailable, TwoNodes, why_unavailable

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
NODE = ("node-0", "node-1")


@pytest.fixture(scope="module")
def bed() -> Iterator[TwoNodes]:
    reason = why_unavailable()
    if reason is not None:
        if IN_CI:
            pytest.fail(f"CI=true: {reason}")
        pytest.skip(reason)
    try:
        made = TwoNodes(f"{os.getpid() % 100000}")
    except BedUnavailable as err:
        if IN_CI:
            pytest.fail(f"CI=true: {err}")
        pytest.skip(str(err))
    with made:
        yield made


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def until(ok: Callable[[], Any], timeout: float, what: Callable[[], str]) -> Any:
    """Poll ``ok()`` until it is truthy; fail with ``what()`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        got = ok()
        if got:
            return got
        assert time.monotonic() < deadline, what()
        time.sleep(0.2)


class Job:
    """The reference trainer on both nodes: one torchrun agent per node, 2 ranks each."""

    def __init__(self, bed: TwoNodes, url: str, logs: Path, *args: str) -> None:
        self.bed = bed
        self.run = f"two-{uuid.uuid4().hex[:8]}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINHEALTH_")}
        env.update({"PYTHONPATH": python_path(), "TRAINHEALTH_URL": url, "TRAINHEALTH_RUN": self.run,
                    **FAST_CLIENT})
        trainer = ["-m", "trainhealth.trainer", "--log-every", "100000", "--pg-timeout", "120", *args]
        port = free_port()
        self.logs = [logs / f"{self.run}-{n}.log" for n in NODE]
        self.agents = [bed.torchrun(n, port, trainer, env, log=self.logs[n]) for n in (0, 1)]

    def log(self) -> str:
        return "\n".join(f"--- {n}:\n{p.read_text()[-2500:]}" for n, p in zip(NODE, self.logs))


def alerts_of(sidecar: Sidecar, run: str) -> list[dict[str, Any]]:
    """The run's alert transitions, oldest first."""
    return sidecar.client.get("/v1/alerts", params={"run": run}).json()["alerts"][::-1]


def status_of(sidecar: Sidecar, run: str) -> dict[str, Any]:
    answer = sidecar.client.get(f"/v1/runs/{run}")
    return answer.json() if answer.status_code == 200 else {}


@pytest.fixture(scope="module")
def job_sidecar(bed: TwoNodes, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    """One sidecar for the job, on node 0, listening on node 0's address."""
    tmp = tmp_path_factory.mktemp("job-sidecar")
    (tmp / "trainhealth.toml").write_text(CONFIG)
    sidecar = Sidecar(["--host", bed.addr(0), "--config", str(tmp / "trainhealth.toml"), "--db",
                       str(tmp / "trainhealth.db")], cwd=tmp, wrap=lambda argv: bed.command(0, argv))
    try:
        yield sidecar
    finally:
        sidecar.stop()


def test_one_sidecar_per_job_names_node_1_for_its_nan_and_its_death(bed, job_sidecar, tmp_path):
    sidecar = job_sidecar
    port = sidecar.url.rsplit(":", 1)[1]
    job = Job(bed, f"http://{{master}}:{port}", tmp_path, "--steps", "100000", "--step-sleep", "0.05",
              "--inject", "nan-data", "--inject-rank", "2", "--inject-step", "8")
    run = job.run

    # every rank, from both nodes, reaches the sidecar on node 0 and trains past the NaN
    until(lambda: (status_of(sidecar, run).get("min_step") or 0) >= 20, 120,
          lambda: f"the job did not train:\n{job.log()}\n{sidecar.stderr_text()[-2000:]}")
    hosts = {r["rank"]: r["host"] for r in status_of(sidecar, run)["rank_states"]}
    assert hosts == {0: "node-0", 1: "node-0", 2: "node-1", 3: "node-1"}  # their own host names

    # the NaN: rank 2's own batch, on node-1; the other ranks got it through the all-reduce
    (nan,) = [a for a in alerts_of(sidecar, run) if a["alert"] == "nan_divergence"]
    assert (nan["state"], nan["rank"], nan["first_rank"], nan["first_step"], nan["cause"]) == \
        ("firing", None, 2, 8, "nonfinite_loss")
    assert (nan["root_ranks"], nan["received_ranks"]) == ([2], [0, 1, 3])
    assert nan["summary"].startswith("loss became nan at step 8 on rank 2 on node-1 (its own loss)"), nan["summary"]

    cut = bed.node_down(1)  # node-1 goes down: link cut, every process killed
    stalled = until(lambda: [a for a in alerts_of(sidecar, run) if a["alert"] == "rank_stalled"], 15,
                    lambda: f"no incident 15 s after the cut:\n{job.log()}")
    named_after = stalled[0]["time"] - cut
    # node-0's ranks cross their step limit (3 s) as well: still one alert, refreshed in place, no new page
    time.sleep(4)
    alerts = alerts_of(sidecar, run)
    assert [(a["alert"], a["state"], a["rank"]) for a in alerts] == [
        ("nan_divergence", "firing", None), ("rank_stalled", "firing", None)], (alerts, job.log())
    a = alerts[1]
    assert (a["host"], a["root_ranks"], a["first_rank"], a["reason"]) == ("node-1", [2, 3], 2, "silent")
    assert (a["waiting_ranks"], a["failed_ranks"]) == ([0, 1], [])  # nothing reached them: they wait
    assert re.match(r"node-1 went silent: ranks 2-3 stopped after steps? \d+(-\d+)? at the same moment \(node "
                    r"down or network partition\); ranks 0-1 on node-0 wait in a collective", a["summary"]), \
        a["summary"]
    assert named_after < 15, named_after
    assert all(p.poll() is None for p in job.agents[:1]), job.log()  # node-0's agent still waits
    findings = status_of(sidecar, run)["findings"]["rank_stalled"]
    assert (findings["host"], findings["root_ranks"]) == ("node-1", [2, 3])
    bed.link_up(1)
