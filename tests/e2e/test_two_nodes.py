"""Two nodes for real (tests/twonodes.py): network namespaces on a bridge, host names node-0 and node-1,
torchrun ``--nnodes 2`` with a c10d rendezvous on node 0 and gloo over the veths, 2 ranks of the reference
trainer per node, real sidecars.

One sidecar per node: each node's ranks send to their own node's sidecar; one Prometheus (the repo's rules,
their ``for:`` scaled to seconds) scrapes both, and both sidecars and Prometheus send to one Alertmanager
(the repo's config, its waits scaled to seconds) that posts to a webhook receiver. NaN on rank 2 (node-1):
the one notification of the run names rank 2 as the first across nodes (TrainhealthNanFirstRank; each
sidecar's own nan_divergence, which sees only its node, is inhibited); then node-1 down: its sidecar goes
with it, TrainhealthNodeDown names it, and node-0's rank_stalled (its ranks wait) is inhibited.

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
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import psutil
import pytest
import yaml

from tests.conftest import IN_CI, ROOT, Sidecar, need_binary, python_path, stop_process
from tests.e2e.test_node_down import CONFIG, FAST_CLIENT  # the same fast stall floors and client
from tests.integration.alerting import Receiver
from tests.twonodes import NETNS_ETC, BedUnavailable, TwoNodes, why_unavailable

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

NODE = ("node-0", "node-1")
TOKEN = "two-nodes-" + "5e1f" * 8  # the sidecars listen on the nodes' network: ranks, the test and Prometheus send it


def make_bed(tag: str) -> TwoNodes:
    """A bed, or skip with the reason it cannot be made here (fail under CI=true)."""
    reason = why_unavailable()
    if reason is None:
        try:
            return TwoNodes(tag)
        except BedUnavailable as err:
            reason = str(err)
    if IN_CI:
        pytest.fail(f"CI=true: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def bed() -> Iterator[TwoNodes]:
    with make_bed(f"{os.getpid() % 100000}") as made:
        yield made


def test_the_bed_removes_everything_it_made():
    bed = make_bed(f"c{os.getpid() % 10000}")
    sleeper = bed.popen(1, ["sleep", "600"])
    # the node's only process, once in its namespace (ip netns exec, unshare and sh exec into it: one pid)
    until(lambda: bed.pids(1) == [sleeper.pid], 10, lambda: f"{bed.pids(1)} in node-1, not [{sleeper.pid}]")
    host = subprocess.run(bed.command(1, ["hostname"]), capture_output=True, text=True, check=True).stdout
    assert host.strip() == "node-1"
    bed.close()
    assert sleeper.poll() is not None
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    links = subprocess.run(["ip", "link"], capture_output=True, text=True, check=True).stdout
    assert not [ns for ns in bed.namespaces if ns in netns]
    assert not [name for name in (bed.bridge, *(o for o, _ in bed.veths)) if f" {name}:" in links
                or f" {name}@" in links]
    assert not [ns for ns in bed.namespaces if (NETNS_ETC / ns).exists()]


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
    """The reference trainer on both nodes: one torchrun agent per node, 2 ranks each; ``urls``: each
    node's TRAINHEALTH_URL."""

    def __init__(self, bed: TwoNodes, urls: tuple[str, str], logs: Path, *args: str) -> None:
        self.bed = bed
        self.run = f"two-{uuid.uuid4().hex[:8]}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINHEALTH_")}
        env.update({"PYTHONPATH": python_path(), "TRAINHEALTH_RUN": self.run, "TRAINHEALTH_TOKEN": TOKEN,
                    **FAST_CLIENT})
        trainer = ["-m", "trainhealth.trainer", "--log-every", "100000", "--pg-timeout", "120", *args]
        port = free_port()
        self.logs = [logs / f"{self.run}-{n}.log" for n in NODE]
        self.agents = [bed.torchrun(n, port, trainer, {**env, "TRAINHEALTH_URL": urls[n]}, log=self.logs[n])
                       for n in (0, 1)]

    def log(self) -> str:
        return "\n".join(f"--- {n}:\n{p.read_text()[-2500:]}" for n, p in zip(NODE, self.logs))

    def kill(self) -> None:
        """Every process this job started on either node (a failed test must not leave ranks running)."""
        family: list[psutil.Process] = []
        for agent in self.agents:
            try:
                family += [psutil.Process(agent.pid), *psutil.Process(agent.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        for p in family:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(family, timeout=10)


@pytest.fixture
def jobs(bed: TwoNodes) -> Iterator[list[Job]]:
    """Jobs started by a test: killed at its end, and node-1's link up again for the next test."""
    started: list[Job] = []
    yield started
    for job in started:
        job.kill()
    bed.link_up(1)


def node_sidecar(bed: TwoNodes, node: int, args: list[str], cwd: Path) -> Sidecar:
    """The real sidecar on ``node``, listening on the node's address with TOKEN; its client sends it."""
    sidecar = Sidecar(["--host", bed.addr(node), "--token", TOKEN, *args], cwd=cwd,
                      wrap=lambda argv: bed.command(node, argv))
    assert sidecar.client.get("/v1/runs").status_code == 401  # the token guards it
    sidecar.client.headers["Authorization"] = f"Bearer {TOKEN}"
    return sidecar


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
    sidecar = node_sidecar(bed, 0, ["--config", str(tmp / "trainhealth.toml"), "--db", str(tmp / "trainhealth.db")],
                           tmp)
    try:
        yield sidecar
    finally:
        sidecar.stop()


def test_one_sidecar_per_job_names_node_1_for_its_nan_and_its_death(bed, job_sidecar, jobs, tmp_path):
    sidecar = job_sidecar
    port = sidecar.url.rsplit(":", 1)[1]
    url = f"http://{{master}}:{port}"  # every rank: the sidecar on the rendezvous host
    job = Job(bed, (url, url), tmp_path, "--steps", "100000", "--step-sleep", "0.05",
              "--inject", "nan-data", "--inject-rank", "2", "--inject-step", "8")
    jobs.append(job)
    run = job.run

    # every rank, from both nodes, reaches the sidecar on node 0 and trains past the NaN
    until(lambda: (status_of(sidecar, run).get("min_step") or 0) >= 12, 120,
          lambda: f"the job did not train:\n{job.log()}\n{sidecar.stderr_text()[-2000:]}")
    hosts = {r["rank"]: r["host"] for r in status_of(sidecar, run)["rank_states"]}
    assert hosts == {0: "node-0", 1: "node-0", 2: "node-1", 3: "node-1"}  # their own host names

    # the NaN: rank 2's own batch, on node-1; the other ranks got it through the all-reduce
    (nan,) = [a for a in alerts_of(sidecar, run) if a["alert"] == "nan_divergence"]
    assert (nan["state"], nan["rank"], nan["first_rank"], nan["first_step"], nan["cause"]) == \
        ("firing", None, 2, 8, "nonfinite_loss")
    assert (nan["root_ranks"], nan["root_hosts"]) == ([2], ["node-1"]), nan
    assert nan["summary"].startswith("loss became nan at step 8 on rank 2 on node-1 (its own loss)"), nan["summary"]
    # what the sidecar said of this job before the cut (the NaN; the detectors may judge its first steps too)
    before = {a["alert"] for a in alerts_of(sidecar, run)}

    cut = bed.node_down(1)  # node-1 goes down: link cut, every process killed
    stalled = until(lambda: [a for a in alerts_of(sidecar, run) if a["alert"] == "rank_stalled"], 15,
                    lambda: f"no incident 15 s after the cut:\n{job.log()}")
    named_after = stalled[0]["time"] - cut
    # node-0's ranks cross their step limit (3 s) as well: still one alert, refreshed in place, no new page
    until(lambda: [a.get("stuck_ranks") for a in alerts_of(sidecar, run) if a["alert"] == "rank_stalled"] == [[0, 1]],
          20, lambda: f"node-0's ranks never listed as stuck: {alerts_of(sidecar, run)}")
    alerts = alerts_of(sidecar, run)
    # the cut made one page: rank_stalled for the run; nothing else new
    assert [(a["alert"], a["state"], a["rank"]) for a in alerts if a["alert"] not in before] == [
        ("rank_stalled", "firing", None)], [(x["alert"], x["state"], x["step"], x["summary"]) for x in alerts]
    (a,) = [a for a in alerts if a["alert"] == "rank_stalled"]
    assert (a["host"], a["root_ranks"], a["first_rank"], a["reason"]) == ("node-1", [2, 3], 2, "silent")
    assert (a["waiting_ranks"], a["failed_ranks"]) == ([0, 1], [])  # nothing reached them: they wait
    assert re.match(r"node-1 went silent: ranks 2-3 stopped after steps? \d+(-\d+)? at the same moment \(node "
                    r"down or network partition\); ranks 0-1 on node-0 wait in a collective", a["summary"]), \
        a["summary"]
    assert named_after < 15, named_after
    print(f"per job: node-1 named {named_after:.2f} s after the cut")  # (pytest -s shows it)
    assert all(p.poll() is None for p in job.agents[:1]), job.log()  # node-0's agent still waits
    findings = status_of(sidecar, run)["findings"]["rank_stalled"]
    assert (findings["host"], findings["root_ranks"]) == ("node-1", [2, 3])


# -- one sidecar per node, one Prometheus, one Alertmanager ------------------------------------------------

NODE_CONFIG = """
[detectors.rank_stalled]
floor_seconds = 10.0
startup_seconds = 30.0
silence_floor_seconds = 2.0

[alertmanager]
resend_seconds = 1.0
"""
SCALED = {"30s": "2s", "20s": "10s", "1m": "2s"}  # the rules' for: and Alertmanager's waits, in seconds here


def scaled(text: str, keys: tuple[str, ...]) -> str:
    """``key: 30s`` lines with the durations of SCALED: the shipped files, on a test's clock."""
    def swap(m: re.Match[str]) -> str:
        return f"{m.group(1)}{SCALED.get(m.group(2), m.group(2))}"
    return re.sub(rf"^(\s*(?:{'|'.join(keys)}): )(\S+)$", swap, text, flags=re.M)


class Server:
    """Prometheus or Alertmanager on the observer (the bridge's address), its log in ``workdir``."""

    def __init__(self, argv: list[str], url: str, log: Path) -> None:
        self.url = url
        self.log_path = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        until(lambda: self._ready(), 30, lambda: f"{argv[0]} not ready:\n{log.read_text()[-3000:]}")

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return self.proc.poll() is not None and False

    def get(self, path: str, **params: str) -> Any:
        answer = httpx.get(f"{self.url}{path}", params=params, timeout=5)
        assert answer.status_code == 200, answer.text
        return answer.json()


@pytest.fixture(scope="module")
def per_node(bed: TwoNodes, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A sidecar on each node, Prometheus scraping both, one Alertmanager posting to a webhook receiver."""
    prometheus, alertmanager = need_binary("prometheus"), need_binary("prometheus-alertmanager")
    tmp = tmp_path_factory.mktemp("per-node")
    receiver = Receiver().start()
    am_port, prom_port = free_port(), free_port()
    am_url = f"http://{bed.observer}:{am_port}"
    am_config = (ROOT / "dashboards" / "alertmanager" / "alertmanager.yml").read_text()
    am_config = scaled(am_config, ("group_wait", "group_interval")).replace(
        "http://webhook-echo:8080/alerts", f"{receiver.url}/alerts")
    (tmp / "am.yml").write_text(am_config)
    for n in (0, 1):  # each sidecar's alerts carry its node's name
        (tmp / f"node{n}.toml").write_text(f'{NODE_CONFIG}node = "{NODE[n]}"\n')
    (tmp / "rules.yml").write_text(scaled((ROOT / "dashboards" / "prometheus" / "rules.yml").read_text(), ("for",)))
    servers: list[Server] = []
    sidecars: list[Sidecar] = []
    try:
        servers.append(Server([alertmanager, f"--config.file={tmp / 'am.yml'}", f"--storage.path={tmp / 'am'}",
                               f"--web.listen-address={bed.observer}:{am_port}", "--cluster.listen-address="],
                              am_url, tmp / "am.log"))
        for n in (0, 1):
            sidecars.append(node_sidecar(bed, n, ["--config", str(tmp / f"node{n}.toml"), "--db",
                                                  str(tmp / f"node{n}.db"), "--alertmanager", am_url], tmp))
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(tmp / "rules.yml")],
            "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"{bed.observer}:{am_port}"]}]}]},
            "scrape_configs": [{"job_name": "trainhealth", "scrape_interval": "1s", "scrape_timeout": "1s",
                                "authorization": {"credentials": TOKEN},
                                "static_configs": [{"targets": [s.url.removeprefix("http://") for s in sidecars]}]}],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        servers.append(Server([prometheus, f"--config.file={tmp / 'prometheus.yml'}",
                               f"--storage.tsdb.path={tmp / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}",
                               "--log.level=warn"], f"http://127.0.0.1:{prom_port}", tmp / "prometheus.log"))
        yield {"sidecars": sidecars, "receiver": receiver, "prometheus": servers[1], "alertmanager": servers[0]}
    finally:
        for s in sidecars:
            s.stop(kill=True)
        for server in servers:
            stop_process(server.proc)
        receiver.stop()


def notifications(receiver: Receiver, run: str) -> list[dict[str, Any]]:
    """Alertmanager's notifications for the run's group, oldest first."""
    out = [d.json() for d in receiver.deliveries("/alerts")]
    return [n for n in out if n["groupLabels"].get("run") == run]


def firing_names(notification: dict[str, Any], severity: str | None = None) -> list[tuple[str, str]]:
    return sorted((a["labels"]["alertname"], a["labels"].get("rank") or a["labels"].get("instance", ""))
                  for a in notification["alerts"] if a["status"] == "firing"
                  and severity in (None, a["labels"].get("severity")))


def test_one_sidecar_per_node_folds_the_nodes_alerts_into_one_notification(bed, per_node, jobs, tmp_path):
    sidecars, receiver, am = per_node["sidecars"], per_node["receiver"], per_node["alertmanager"]
    node1 = sidecars[1].url.removeprefix("http://")  # node-1's sidecar: Prometheus's instance label
    job = Job(bed, (sidecars[0].url, sidecars[1].url), tmp_path, "--steps", "100000", "--step-sleep", "0.05",
              "--inject", "nan-data", "--inject-rank", "2", "--inject-step", "8")
    jobs.append(job)
    run = job.run
    until(lambda: min((status_of(s, run).get("min_step") or 0) for s in sidecars) >= 12, 120,
          lambda: f"the job did not train:\n{job.log()}")
    # each sidecar saw only its node's ranks, and each raised its own nan_divergence
    assert [sorted(r["rank"] for r in status_of(s, run)["rank_states"]) for s in sidecars] == [[0, 1], [2, 3]]
    assert [[a["first_rank"] for a in alerts_of(s, run) if a["alert"] == "nan_divergence"] for s in sidecars] == \
        [[0], [2]]

    # in Alertmanager: the first NaN rank over both nodes inhibits both sidecars' own nan_divergence
    def in_am() -> list[tuple[str, str | None, str | None, bool]]:
        return sorted((a["labels"]["alertname"], a["labels"].get("node"), a["labels"].get("rank"),
                       bool(a["status"]["inhibitedBy"])) for a in am.get("/api/v2/alerts", filter=f'run="{run}"')
                      if a["labels"]["alertname"] in ("TrainhealthNanFirstRank", "nan_divergence"))
    nan_folded = [("TrainhealthNanFirstRank", None, "2", False), ("nan_divergence", "node-0", None, True),
                  ("nan_divergence", "node-1", None, True)]
    until(lambda: in_am() == nan_folded, 30, lambda: f"Alertmanager has {in_am()}")

    bed.node_down(1)  # node-1 and its sidecar go down
    def node_down_notified() -> list[dict[str, Any]]:
        return [n for n in notifications(receiver, run) if ("TrainhealthNodeDown", node1) in firing_names(n)]
    until(node_down_notified, 40, lambda: f"no TrainhealthNodeDown: {notifications(receiver, run)}")
    # node-0's ranks wait in a collective: its sidecar's rank_stalled reaches Alertmanager, inhibited
    def stalled_in_am() -> list[dict[str, Any]]:
        return [a for a in am.get("/api/v2/alerts", filter=f'run="{run}"')
                if a["labels"]["alertname"] == "rank_stalled"]
    (stalled,) = until(stalled_in_am, 30, lambda: f"node-0's rank_stalled is not in Alertmanager:\n{job.log()}")
    assert (stalled["labels"]["node"], bool(stalled["status"]["inhibitedBy"])) == ("node-0", True), stalled
    time.sleep(3)  # a group interval (2 s here) after it: nothing else was notified

    sent = notifications(receiver, run)
    first = sent[0]  # the run's first notification names the first NaN rank across the nodes
    assert ("TrainhealthNanFirstRank", "2") in firing_names(first), first
    assert ("nan_divergence", "") not in firing_names(first), first  # inhibited: each sidecar sees one node
    (nan,) = [a for a in first["alerts"] if a["status"] == "firing" and a["labels"]["alertname"] ==
              "TrainhealthNanFirstRank"]
    assert nan["labels"]["instance"] == node1
    assert f"the loss went NaN/Inf first on rank 2 (sidecar {node1}) at step 8, across every node" in \
        nan["annotations"]["summary"]
    # what was paged critical for the run, over all its notifications: those two and nothing per node.
    # (node-0's sidecar may be scraped first: ranks 0-1 at step 9 look first for a second and are resolved
    # once rank 2's step 8 is in; they are never firing in a notification, as the group waits 10 s)
    assert {f for n in sent for f in firing_names(n, "critical")} == {("TrainhealthNanFirstRank", "2"),
                                                                      ("TrainhealthNodeDown", node1)}, sent
