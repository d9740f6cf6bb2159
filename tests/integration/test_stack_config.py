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
    assert "SUCCESS: 11 rules found" in out.stdout


def test_promtool_rule_unit_tests_pass_and_cover_every_rule() -> None:
    run([need_binary("promtool"), "test", "rules", "rules_test.yml"], cwd=PROMETHEUS_DIR)
    rules = yaml.safe_load((PROMETHEUS_DIR / "rules.yml").read_text())
    tests = yaml.safe_load((PROMETHEUS_DIR / "rules_test.yml").read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    fired = {t["alertname"] for case in tests["tests"] for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert fired == names


def test_amtool_accepts_the_alertmanager_config() -> None:
    run([need_binary("amtool"), "check-config", str(ROOT / "dashboards" / "alertmanager" / "alertmanager.yml")])


def test_docker_compose_file_is_valid_and_mounts_existing_files(tmp_path: Path) -> None:
    # as a user runs it: the repository with trainhealth.env made from the example (git ignores the real one)
    for entry in ROOT.iterdir():
        if entry.name != "trainhealth.env":
            (tmp_path / entry.name).symlink_to(entry)
    (tmp_path / "trainhealth.env").write_text((ROOT / "trainhealth.env.example").read_text())
    run([need_binary("docker-compose"), "-f", "docker-compose.yml", "config", "-q"], cwd=tmp_path)
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


def test_compose_stack_passes_a_token_to_every_service_that_talks_to_the_sidecar() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    for name in ("sidecar", "trainer", "prometheus"):
        assert services[name]["env_file"] == ["trainhealth.env"], name
    example = (ROOT / "trainhealth.env.example").read_text()
    assert "\nTRAINHEALTH_TOKEN=" in example
    assert "/trainhealth.env" in (ROOT / ".gitignore").read_text().split()  # the secret never committed
    assert "trainhealth.env" in (ROOT / ".dockerignore").read_text().split()  # never baked into an image
    scrape = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["authorization"] == {"credentials_file": "trainhealth.token"}
    assert "/etc/prometheus/trainhealth.token" in " ".join(services["prometheus"]["entrypoint"])


def test_the_names_the_stack_reaches_the_sidecar_by_are_names_it_answers_to() -> None:
    from urllib.parse import urlsplit

    from trainhealth.cli import build_parser
    from trainhealth.config import load
    from trainhealth.http.hosts import HostNames

    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    args = build_parser().parse_args(services["sidecar"]["command"])
    server = load(None, {"host": args.host, "allowed_hosts": args.allowed_hosts}).server
    names = HostNames(server.allowed_hosts, server.host, machine="0123abcd")  # a container's hostname
    trainer = urlsplit(services["trainer"]["environment"]["TRAINHEALTH_URL"]).hostname
    scrape = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())["scrape_configs"][0]
    (target,) = scrape["static_configs"][0]["targets"]
    assert (trainer, target.rsplit(":", 1)[0]) == ("sidecar", "sidecar")
    assert names.allows("sidecar") and not names.allows("evil.example")


def test_docker_image_binds_loopback_unless_told_otherwise() -> None:
    cmd = next(line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("CMD ["))
    assert "--host" not in cmd  # the sidecar's default, 127.0.0.1


def test_compose_publishes_prometheus_alertmanager_and_grafana_on_loopback_only() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for name in ("prometheus", "alertmanager", "grafana"):  # lifecycle API, silences, anonymous viewers
        for published in services[name].get("ports", []):
            assert str(published).startswith("127.0.0.1:"), f"{name} publishes {published} on every interface"
    assert "--token" not in " ".join(services["sidecar"]["command"])  # from trainhealth.env, never argv
