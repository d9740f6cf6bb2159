"""The PromQL of dashboards/: extract every expression, fill Grafana variables, find the metric names.

Shared by the unit test (names only) and the integration test (a real Prometheus evaluates them).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import yaml

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = sorted((ROOT / "dashboards" / "grafana" / "dashboards").glob("*.json"))
RULES = ROOT / "dashboards" / "prometheus" / "rules.yml"

# Series Prometheus makes itself, not the sidecar.
PROMETHEUS_NAMES = {"up", "ALERTS", "scrape_duration_seconds"}
GRAFANA_BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}
# What the tests substitute for each dashboard variable.
TEST_VALUES = {"run": ".*", "rank": ".*", "job": "trainhealth", "datasource": "prometheus"}

KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
            "group_right", "inf", "nan"}
LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*$", re.S)


def dashboard_expressions(path: Path) -> Iterator[tuple[str, str]]:
    """(where, expression) for every target, annotation and query variable of a dashboard."""
    doc = json.loads(path.read_text())
    for where, node in _walk(doc, path.name):
        expr = node.get("expr")
        if isinstance(expr, str):
            yield where, expr
    for var in doc.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = LABEL_VALUES.match(query)
            assert m, f"{path.name} variable {var['name']}: only label_values(expr, label) works: {query}"
            yield f"{path.name} variable {var['name']}", m.group(1)


def rule_expressions(path: Path = RULES) -> Iterator[tuple[str, str]]:
    doc = yaml.safe_load(path.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            yield f"{path.name} {rule.get('alert') or rule.get('record')}", rule["expr"]


def recorded_names(path: Path = RULES) -> set[str]:
    """Series the rules record themselves (``record:``), which other rules select."""
    doc = yaml.safe_load(path.read_text())
    return {rule["record"] for group in doc["groups"] for rule in group["rules"] if "record" in rule}


def all_expressions() -> list[tuple[str, str]]:
    out = [e for path in DASHBOARDS for e in dashboard_expressions(path)]
    return out + list(rule_expressions())


def _walk(node: Any, where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(node, dict):
        here = f"{where} / {node['title']}" if isinstance(node.get("title"), str) else where
        if "name" in node and "expr" in node:
            here = f"{where} / annotation {node['name']}"
        yield here, node
        for value in node.values():
            yield from _walk(value, here)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item, where)


def variables_used(expr: str) -> set[str]:
    return set(re.findall(r"\$\{?(\w+)", expr))


def substitute(expr: str) -> str:
    """Grafana variables -> values a test Prometheus can evaluate; unknown variables raise KeyError."""
    values = {**GRAFANA_BUILTINS, **TEST_VALUES}
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values[m.group(1)], expr)


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (functions, keywords, labels and numbers left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # string literals
    text = re.sub(r"\{[^{}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\[\]]*\]", " ", text)  # ranges, subqueries
    text = re.sub(r"\boffset\s+-?\w+", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)
    text = re.sub(r"(?<![\w:])\d+(\.\d+)?([eE][+-]?\d+)?(?![\w:])", " ", text)  # numbers
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = m.group(0)
        if word.lower() in KEYWORDS or re.match(r"\s*\(", text[m.end():]):
            continue
        names.add(word)
    return names
