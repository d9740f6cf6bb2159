"""Every bad value in every section of the config file is one ConfigError line: dotted key, rule, value.

The cases are generated from the settings dataclasses themselves, so a new setting is covered the day it is
added: a value of the wrong type for every key of every section, and -1 for every numeric key.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

import pytest
from trainhealth.config import (
    AlertmanagerSettings,
    ConfigError,
    ExporterSettings,
    Limits,
    ServerSettings,
    WebhookSettings,
    load,
)
from trainhealth.detectors import ALL

# (header of the table, its dataclass, the keys it needs to be valid, the dotted name errors use)
SECTIONS: list[tuple[str, type, dict[str, Any], str]] = [
    ("[server]", ServerSettings, {}, "server"),
    ("[limits]", Limits, {}, "limits"),
    ("[[webhooks]]", WebhookSettings, {"url": "http://127.0.0.1:9/hook"}, "webhooks[0]"),
    ("[alertmanager]", AlertmanagerSettings, {"url": "http://127.0.0.1:9093"}, "alertmanager"),
    ("[exporter]", ExporterSettings, {}, "exporter"),
] + [(f"[detectors.{d.name}]", d.Settings, {}, f"detectors.{d.name}") for d in ALL]


def wrong_type(hint: Any) -> Any:
    """A TOML value that is not of this type."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is bool:
        return "yes"
    if hint is int:
        return 1.5
    if hint is float:
        return "1"
    if hint is str:
        return 5
    if typing.get_args(hint)[:1] == (int,):
        return ["1"]  # lists and tuples of integers (gpu_fault.xids)
    return [1]  # lists and tuples of strings


def cases(kind: str) -> list[Any]:
    out = []
    for header, cls, needed, dotted in SECTIONS:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if kind == "type":
                out.append(pytest.param(header, needed, dotted, f.name, wrong_type(hint),
                                        id=f"{dotted}.{f.name}"))
            elif kind == "negative" and hint in (int, float):
                out.append(pytest.param(header, needed, dotted, f.name, -1, id=f"{dotted}.{f.name}"))
    return out


def refused(tmp_path: Path, header: str, needed: dict[str, Any], key: str, value: Any) -> str:
    values = {**needed, key: value}
    path = tmp_path / "c.toml"
    path.write_text(header + "\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    with pytest.raises(ConfigError) as err:
        load(str(path), {}, {})
    return str(err.value)


def config_error(tmp_path: Path, text: str) -> str:
    """The ConfigError a config file of ``text`` gets."""
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load(str(path), {}, {})
    return str(err.value)


@pytest.mark.parametrize("header, needed, dotted, key, value", cases("type"))
def test_a_value_of_the_wrong_type_is_one_line_naming_key_and_value(tmp_path: Path, header: str,
                                                                   needed: dict[str, Any], dotted: str,
                                                                   key: str, value: Any) -> None:
    message = refused(tmp_path, header, needed, key, value)
    shown = (value, tuple(value), value[0]) if isinstance(value, list) else (value,)  # the list, or its item
    assert message.startswith((f"{dotted}.{key}: must be ", f"{dotted}.{key}[0]: must be "))
    assert message.endswith(tuple(f", got {v!r}" for v in shown)) and "\n" not in message


@pytest.mark.parametrize("header, needed, dotted, key, value", cases("negative"))
def test_minus_one_is_refused_for_every_numeric_setting(tmp_path: Path, header: str, needed: dict[str, Any],
                                                        dotted: str, key: str, value: Any) -> None:
    message = refused(tmp_path, header, needed, key, value)
    assert message.startswith(f"{dotted}.{key}: must be ") and message.endswith(", got -1")


def test_the_issue_example_reads_exactly(tmp_path: Path) -> None:
    message = refused(tmp_path, "[detectors.rank_stalled]", {}, "floor_seconds", -1)
    assert message == "detectors.rank_stalled.floor_seconds: must be a positive number, got -1"


@pytest.mark.parametrize("text, message", [
    ("[detectors.host_memory_leak]\nbucket_seconds = 60\nwindow_seconds = 100\n",
     "detectors.host_memory_leak.window_seconds: must be >= 4 x bucket_seconds (240), got 100"),
    ("[detectors.host_memory_leak]\nmin_window_seconds = 8000.0\n",
     "detectors.host_memory_leak.min_window_seconds: must be <= window_seconds (7200.0), got 8000.0"),
    ("[detectors.host_memory_leak]\nwarning_hours = 1\n",
     "detectors.host_memory_leak.warning_hours: must be >= critical_hours (2.0), got 1"),
    ("[detectors.host_memory_leak]\nfast_min_seconds = 700\nfast_window_seconds = 600\n",
     "detectors.host_memory_leak.fast_min_seconds: must be <= fast_window_seconds (600), got 700"),
    ("[detectors.rank_stalled]\nfactor = 0.5\n", "detectors.rank_stalled.factor: must be >= 1, got 0.5"),
    ("[detectors.rank_stalled]\nfloor_seconds = 600.5\nceiling_seconds = 300.0\n",
     "detectors.rank_stalled.ceiling_seconds: must be >= floor_seconds (600.5), got 300.0"),
    ("[detectors.lr_scaling]\nfactor = 2.5\ncritical_factor = 2.25\n",
     "detectors.lr_scaling.critical_factor: must be >= factor (2.5), got 2.25"),
    ("[detectors.loss_spike]\nz_resolve = 11.0\n",
     "detectors.loss_spike.z_resolve: must be <= z_threshold (10), got 11.0"),
    ("[detectors.loss_spike]\nsoft_ratio = 2.5\n",
     "detectors.loss_spike.soft_ratio: must be <= min_ratio (2), got 2.5"),
    ("[detectors.loss_spike]\nz_threshold = 12.5\nsoft_z = 12\n",
     "detectors.loss_spike.soft_z: must be >= z_threshold (12.5), got 12"),
    ("[detectors.grad_explosion]\nsoft_ratio = 6.0\n",
     "detectors.grad_explosion.soft_ratio: must be <= min_ratio (5), got 6.0"),
    ("[detectors.straggler]\nratio = 1\n", "detectors.straggler.ratio: must be > 1, got 1"),
    ("[stop]\nmin_lead_steps = 5\nmax_lead_steps = 4\n",
     "stop.max_lead_steps: must be >= stop.min_lead_steps (5), got 4"),
])
def test_a_setting_out_of_order_with_another_names_both(tmp_path: Path, text: str, message: str) -> None:
    assert config_error(tmp_path, text) == message


@pytest.mark.parametrize("text, message", [
    ("[detector.rank_stalled]\nfloor_seconds = 5\n",
     "detector: unknown section (known: server, limits, detectors, webhooks, alertmanager, exporter, stop)"),
    ("[detectors.rank_stalled]\nflor_seconds = 5\n", "detectors.rank_stalled.flor_seconds: unknown setting"),
    ("[limits]\nmax_run = 5\n", "limits.max_run: unknown setting"),
    ("[server]\nprot = 5\n", "server.prot: unknown setting"),
    ("[[webhooks]]\nurl = \"http://h/x\"\nretries = 3\n", "webhooks[0].retries: unknown setting"),
    ("[[webhooks]]\nformat = \"trainhealth\"\n", "webhooks[0].url: required, missing"),
    ("[alertmanager]\nresend_seconds = 5\n", "alertmanager.url: required, missing"),
    ("server = 5\n", "server: must be a table, got 5"),
    ("detectors = 5\n", "detectors: must be a table, got 5"),
    ("[detectors]\nrank_stalled = 5\n", "detectors.rank_stalled: must be a table, got 5"),
    ("webhooks = 5\n", "webhooks: must be an array of tables ([[webhooks]]), got 5"),
    ("[server]\nwebhooks = [\"ftp://x\"]\n", "server.webhooks[0]: must be an http(s) URL, got 'ftp://x'"),
    ("[server]\nport = 70000\n", "server.port: must be an integer 0-65535, got 70000"),
])
def test_unknown_keys_sections_and_shapes_are_refused(tmp_path: Path, text: str, message: str) -> None:
    assert config_error(tmp_path, text).startswith(message)


@pytest.mark.parametrize("header, cls", [("[server]", ServerSettings), ("[limits]", Limits),
                                         ("[[webhooks]]", WebhookSettings), ("[alertmanager]", AlertmanagerSettings),
                                         ("[exporter]", ExporterSettings)])
def test_docs_config_md_lists_every_key_with_its_default(header: str, cls: type) -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "config.md").read_text()
    for f in dataclasses.fields(cls):
        if f.default is dataclasses.MISSING:
            continue  # required, or a list/None shown in words
        shown = json.dumps(f.default) if isinstance(f.default, (str, bool)) else repr(f.default)
        assert f"| `{f.name}` |" in text and (f.default is None or f"`{shown}`" in text), (header, f.name)
