"""A real Prometheus scrapes a real sidecar fed over HTTP; every dashboard and rule expression runs on it."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import yaml
from trainhealth.metrics.collector import WEBHOOK_NAMES, exported_names

from tests.conftest import Sidecar, need_binary, stop_process
from tests.promql import RULES, all_expressions, metric_names, substitute

pytestmark = pytest.mark.integration

TOKEN = "scrape-token"
FIELDS = {"lr": 0.02, "grad_norm": 1.5, "grad_scale": 1024.0, "gpu_mem_peak_bytes": 6e9,
          "gpu_mem_total_bytes": 8e9, "gpu_mem_allocated_bytes": 4e9, "gpu_mem_reserved_bytes": 7e9,
          "host_mem_bytes": 3e9, "host_mem_available_bytes": 5e10, "host_mem_total_bytes": 6.4e10,
          "step_time_seconds": 0.5, "data_time_seconds": 0.1, "compute_seconds": 0.3, "comm_wait_seconds": 0.1}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    def __init__(self, binary: str, workdir: Path, target: str) -> None:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{
                "job_name": "trainhealth", "scrape_interval": "1s", "scrape_timeout": "1s",
                "authorization": {"credentials": TOKEN},
                "static_configs": [{"targets": [target]}],
            }],
        }
        path = workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        port = free_port()
        self.log = open(workdir / "prometheus.log", "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [binary, f"--config.file={path}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
        self.workdir = workdir
        self.wait_for(lambda: self.client.get("/-/ready").status_code == 200, "ready")

    def wait_for(self, ready: Any, what: str, seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                if ready():
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"prometheus not {what}:\n{(self.workdir / 'prometheus.log').read_text()}")

    def query(self, expr: str) -> httpx.Response:
        return self.client.get("/api/v1/query", params={"query": expr})

    def result(self, expr: str) -> list[dict[str, Any]]:
        response = self.query(expr)
        assert response.status_code == 200, f"{expr}: {response.text}"
        return response.json()["data"]["result"]  # type: ignore[no-any-return]

    def stop(self) -> None:
        self.client.close()
        stop_process(self.proc)
        self.log.close()


def feed(sidecar: Sidecar) -> None:
    now = time.time()
    records = [
        {"run": "job-a", "rank": 0, "time": now, "step": 10, "loss": 2.5, **FIELDS},
        {"run": "job-a", "rank": 1, "time": now, "step": 10, "loss": "NaN", **FIELDS},
        {"run": "job-b", "rank": 0, "time": now, "step": 3, "loss": 4.0},
        {"run": "job-b", "rank": -1, "time": now, "step": 3},  # rejected: rank < 0
    ]
    response = sidecar.client.post("/v1/ingest", content=json.dumps(records),
                                   headers={"Authorization": f"Bearer {TOKEN}",
                                            "Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    assert response.json()["accepted"] == 3
    refused = sidecar.client.post("/v1/ingest", content=b"[", headers={"Authorization": f"Bearer {TOKEN}",
                                                                       "Content-Type": "application/json"})
    assert refused.status_code == 400


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sidecar, Prometheus]]:
    """The sidecar (conftest's Sidecar, as the start_sidecar fixture runs it) and a Prometheus scraping it."""
    binary = need_binary("prometheus")
    workdir = tmp_path_factory.mktemp("prometheus")
    sidecar = Sidecar(["--db", str(workdir / "trainhealth.db"), "--token", TOKEN], cwd=workdir)
    prometheus = None
    try:
        feed(sidecar)
        prometheus = Prometheus(binary, workdir, sidecar.url.removeprefix("http://"))
        prometheus.wait_for(lambda: len(prometheus.result("trainhealth_loss")) == 3, "scraping the sidecar")
        yield sidecar, prometheus
    finally:
        if prometheus is not None:
            prometheus.stop()
        sidecar.stop()


def by_labels(result: list[dict[str, Any]], *keys: str) -> dict[tuple[str, ...], str]:
    return {tuple(r["metric"][k] for k in keys): r["value"][1] for r in result}


def test_sidecar_metrics_arrive_in_prometheus_with_labels(stack: tuple[Sidecar, Prometheus]) -> None:
    sidecar, prom = stack
    assert sidecar.client.get("/metrics").status_code == 401  # the token guards /metrics too
    assert by_labels(prom.result('up{job="trainhealth"}'), "job") == {("trainhealth",): "1"}
    loss = prom.result("trainhealth_loss")
    assert {(r["metric"]["job"], r["metric"]["instance"]) for r in loss} == {
        ("trainhealth", sidecar.url.removeprefix("http://"))}
    assert by_labels(loss, "run", "rank") == {("job-a", "0"): "2.5", ("job-a", "1"): "NaN",
                                              ("job-b", "0"): "4"}
    assert math.isnan(float(by_labels(loss, "run", "rank")[("job-a", "1")]))
    assert by_labels(prom.result("trainhealth_step"), "run", "rank") == {
        ("job-a", "0"): "10", ("job-a", "1"): "10", ("job-b", "0"): "3"}
    assert by_labels(prom.result('trainhealth_gpu_memory_peak_bytes{run="job-a"}'), "rank") == {
        ("0",): "6000000000", ("1",): "6000000000"}
    assert by_labels(prom.result("trainhealth_alerts_firing"), "run", "alert", "severity") == {
        ("job-a", "nan_divergence", "critical"): "1"}
    assert by_labels(prom.result("trainhealth_records_rejected_total"), "reason") == {
        ("invalid",): "1", ("capped",): "0"}
    assert prom.result("trainhealth_records_ingested_total")[0]["value"][1] == "3"
    assert by_labels(prom.result("trainhealth_ingest_bodies_refused_total"), "status") == {("400",): "1"}
    assert prom.result("trainhealth_ingest_duration_seconds_count")[0]["value"][1] == "2"


def test_every_exported_name_reaches_prometheus(stack: tuple[Sidecar, Prometheus]) -> None:
    _, prom = stack
    names = set(prom.client.get("/api/v1/label/__name__/values").json()["data"])
    optional = set(WEBHOOK_NAMES)  # only with an alert outbox that reports delivery_stats()
    assert exported_names() - optional <= names
    assert {n for n in names if n.startswith("trainhealth_")} <= exported_names()


EXPRESSIONS = all_expressions()


@pytest.mark.parametrize("where, expr", EXPRESSIONS, ids=[w for w, _ in EXPRESSIONS])
def test_dashboard_and_rule_expression_evaluates(stack: tuple[Sidecar, Prometheus], where: str,
                                                 expr: str) -> None:
    _, prom = stack
    response = prom.query(substitute(expr))
    assert response.status_code == 200, f"{where}: {response.text}"
    assert response.json()["status"] == "success"
    names = metric_names(expr)
    instant_data = "[" not in expr and not names & ({"ALERTS"} | set(WEBHOOK_NAMES))
    if instant_data and not where.startswith("rules.yml"):
        assert response.json()["data"]["result"], f"{where}: no data for {substitute(expr)}"


def test_fleet_rules_load_and_evaluate_in_prometheus(stack: tuple[Sidecar, Prometheus]) -> None:
    _, prom = stack

    def rules() -> list[dict[str, Any]]:
        groups = prom.client.get("/api/v1/rules").json()["data"]["groups"]
        return [r for g in groups for r in g["rules"]]

    prom.wait_for(lambda: all(not r["lastEvaluation"].startswith("0001") for r in rules()), "evaluating rules")
    loaded = rules()
    assert {r["name"] for r in loaded} == {w.split()[1] for w, _ in EXPRESSIONS if w.startswith("rules.yml")}
    assert [(r["name"], r["health"], r.get("lastError", "")) for r in loaded if r["health"] != "ok"] == []
