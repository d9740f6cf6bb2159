"""The shipped configs pass their own tools: promtool, amtool, docker-compose (no Docker engine needed)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, need_binary

pytestmark = pytest.mark.integration

PROMETHEUS_DIR = ROOT / "dashboards" / "prometheus"


def run(args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def test_promtool_check_config_passes_with_the_rules() -> None:
    out = run([need_binary("promtool"), "check", "config", str(PROMETHEUS_DIR / "prometheus.yml")])
    assert "SUCCESS: 1 rule files found" in out.stdout


def test_promtool_check_rules_passes() -> None:
    out = run([need_binary("promtool"), "check", "rules", str(PROMETHEUS_DIR / "rules.yml")])
    assert "SUCCESS: 6 rules found" in out.stdout


def test_promtool_rule_unit_tests_pass_and_cover_every_rule() -> None:
    run([need_binary("promtool"), "test", "rules", "rules_test.yml"], cwd=PROMETHEUS_DIR)
    rules = yaml.safe_load((PROMETHEUS_DIR / "rules.yml").read_text())
    tests = yaml.safe_load((PROMETHEUS_DIR / "rules_test.yml").read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    fired = {t["alertname"] for case in tests["tests"] for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert fired == names


def test_amtool_accepts_the_alertmanager_config() -> None:
    run([need_binary("amtool"), "check-config", str(ROOT / "dashboards" / "alertmanager" / "alertmanager.yml")])


def test_docker_compose_file_is_valid_and_mounts_existing_files() -> None:
    run([need_binary("docker-compose"), "-f", "docker-compose.yml", "config", "-q"])
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"sidecar", "trainer", "prometheus", "alertmanager", "grafana"} <= set(services)
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
        build = service.get("build")
        if build:
            assert (ROOT / build["context"] / "Dockerfile").exists()
            assert f"AS {build['target']}" in (ROOT / "Dockerfile").read_text()
    assert services["trainer"]["environment"]["TRAINHEALTH_URL"] == "http://sidecar:9464"
    assert services["sidecar"]["command"][:4] == ["serve", "--host", "0.0.0.0", "--port"]
