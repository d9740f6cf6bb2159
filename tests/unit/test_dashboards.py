"""dashboards/: PromQL names match the exporter, Grafana JSON is consistent, provisioning matches compose."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from trainhealth.metrics.collector import PER_RANK_STATE, PER_RANK_VALUES, exported_names

from tests.promql import (
    DASHBOARDS,
    GRAFANA_BUILTINS,
    PROMETHEUS_NAMES,
    ROOT,
    all_expressions,
    dashboard_expressions,
    metric_names,
    recorded_names,
    substitute,
    variables_used,
)

EXPRESSIONS = all_expressions()


def load(name: str) -> dict:
    return json.loads(dashboard_path(name).read_text())


def dashboard_path(name: str) -> Path:
    return ROOT / "dashboards" / "grafana" / "dashboards" / name


def test_dashboards_and_rules_are_found() -> None:
    assert {p.name for p in DASHBOARDS} == {"trainhealth-job.json", "trainhealth-fleet.json"}
    assert len(EXPRESSIONS) >= 60


@pytest.mark.parametrize("where, expr", EXPRESSIONS, ids=[w for w, _ in EXPRESSIONS])
def test_expression_selects_only_metrics_the_sidecar_exports(where: str, expr: str) -> None:
    names = metric_names(expr)
    assert names, f"{where}: no metric name found in {expr!r}"
    unknown = names - exported_names() - PROMETHEUS_NAMES - recorded_names()
    assert not unknown, f"{where}: {sorted(unknown)} are not exported by trainhealth (expr: {expr})"


def test_name_parser_skips_functions_labels_keywords_numbers_and_strings() -> None:
    expr = ('histogram_quantile(0.99, sum by (instance, le) (rate(trainhealth_ingest_duration_seconds_bucket'
            '{job="x", run=~"$run"}[$__rate_interval]))) > on (run) group_left 1.3e2 * quantile by (run) '
            '(0.5, trainhealth_step offset 10m) unless ALERTS{alertname="trainhealth_loss"}')
    assert metric_names(expr) == {"trainhealth_ingest_duration_seconds_bucket", "trainhealth_step", "ALERTS"}
    assert metric_names("time() - max(trainhealth_los{run='a'})") == {"trainhealth_los"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_defines_every_variable_its_queries_use(path: Path) -> None:
    doc = json.loads(path.read_text())
    defined = {v["name"] for v in doc["templating"]["list"]} | set(GRAFANA_BUILTINS)
    for where, expr in dashboard_expressions(path):
        missing = variables_used(expr) - defined
        assert not missing, f"{where}: uses undefined variables {missing}"
        substitute(expr)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_panels_use_the_datasource_variable_and_do_not_overlap(path: Path) -> None:
    doc = json.loads(path.read_text())
    panels = doc["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["description"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]


def test_job_dashboard_has_run_variable_alert_annotations_and_every_per_rank_metric() -> None:
    doc = load("trainhealth-job.json")
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["run"]["definition"] == "label_values(trainhealth_step, run)"
    annotations = [a.get("expr", "") for a in doc["annotations"]["list"]]
    assert any("trainhealth_alerts_firing" in a for a in annotations)
    exprs = dashboard_expressions(dashboard_path("trainhealth-job.json"))
    used = set().union(*(metric_names(e) for _, e in exprs))
    assert {n for n, _, _ in PER_RANK_VALUES} | set(PER_RANK_STATE) <= used


def test_provisioning_matches_the_compose_mounts() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    grafana = compose["services"]["grafana"]["volumes"]
    mounts = dict(v.split(":")[:2] for v in grafana)
    provisioning = ROOT / "dashboards/grafana/provisioning"
    provider = yaml.safe_load((provisioning / "dashboards/trainhealth.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == mounts["./dashboards/grafana/dashboards"]
    assert mounts["./dashboards/grafana/provisioning"] == "/etc/grafana/provisioning"
    source = yaml.safe_load((provisioning / "datasources/trainhealth.yml").read_text())
    assert source["datasources"][0]["url"] == "http://prometheus:9090"
    scrape = yaml.safe_load((ROOT / "dashboards/prometheus/prometheus.yml").read_text())
    job = next(j for j in scrape["scrape_configs"] if j["job_name"] == "trainhealth")
    assert job["static_configs"][0]["targets"] == ["sidecar:9464"]
    assert "--alertmanager" in compose["services"]["sidecar"]["command"]
    assert {load(p.name)["uid"] for p in DASHBOARDS} == {"trainhealth-job", "trainhealth-fleet"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_dashboard_marks_the_sidecars_alerts_on_its_curves(path: Path) -> None:
    """An enabled, visible annotation from trainhealth_alerts_firing, titled by alert and severity, on a
    datasource the dashboard defines: Grafana then draws each firing alert as a region on every time series."""
    doc = json.loads(path.read_text())
    marks = [a for a in doc["annotations"]["list"] if "trainhealth_alerts_firing" in a.get("expr", "")]
    assert len(marks) == 1, [a.get("name") for a in doc["annotations"]["list"]]
    (mark,) = marks
    assert mark["enable"] is True and not mark.get("hide", False)
    assert mark["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    assert "{{alert}}" in mark["titleFormat"] and "{{run}}" in mark["textFormat"]
    assert {"alert", "severity"} <= set(mark["tagKeys"].split(","))
    assert metric_names(mark["expr"]) == {"trainhealth_alerts_firing"}
    assert "> 0" in mark["expr"] and "by (run, alert, severity)" in mark["expr"]  # only while firing
    # no panel opts out of the annotations (a panel-level filter would hide the markers there)
    series = [p for p in doc["panels"] if p["type"] == "timeseries"]
    assert series and not any(p.get("options", {}).get("annotations") is False for p in series)
    assert "filter" not in mark
