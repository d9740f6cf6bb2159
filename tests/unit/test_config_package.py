"""The config package and the detectors depend on each other only through config.rules (a leaf): whichever
a program imports first, both load (the detectors' settings use the rules; the loader reads detectors.ALL)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("first", ["trainhealth.detectors.spikes", "trainhealth.detectors", "trainhealth.config",
                                   "trainhealth.metrics.collector"])
def test_either_side_imports_first(first: str) -> None:
    code = (f"import {first}\n"
            "from trainhealth.config import load\n"
            "assert load(None).detectors['loss_spike'].enabled\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_config_reads_no_metrics_and_the_rules_nothing_of_trainhealth() -> None:
    from tests.unit.test_import_graph import graph

    edges = graph()
    config = {m for m in edges if m == "trainhealth.config" or m.startswith("trainhealth.config.")}
    assert config == {"trainhealth.config", "trainhealth.config.rules", "trainhealth.config.sections",
                      "trainhealth.config.load"}
    assert not [m for c in config for m in edges[c] if m.startswith("trainhealth.metrics")]
    assert edges["trainhealth.config.rules"] == set()
