"""Settings: the whole configuration, and the one loader that fills it.

Precedence: command-line flag > ``TRAINHEALTH_*`` environment variable >
TOML file (``--config``) > default. Detector thresholds live in the TOML file
under ``[detectors.NAME]`` and can be reloaded (SIGHUP, ``POST /-/reload``).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# The package, not its ALL: the detectors import config.rules, so this module may be imported while
# detectors/__init__ is still running; ALL is read when settings are built.
from .. import detectors
from . import rules
from .rules import ConfigError, build
from .sections import AlertmanagerSettings, ExporterSettings, Limits, ServerSettings, StopSettings, WebhookSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Every top-level table the file may hold; anything else is a typo (``[detector.rank_stalled]``) that would
# otherwise silently leave every threshold at its default.
SECTIONS = ("server", "limits", "detectors", "webhooks", "alertmanager", "exporter", "stop")


def default_detector_settings() -> dict[str, Any]:
    return {d.name: d.Settings() for d in detectors.ALL}


@dataclass(kw_only=True, slots=True)
class Settings:
    """Every section, each checked when it was built: one object handed to what assembles the sidecar."""

    server: ServerSettings = field(default_factory=ServerSettings)
    limits: Limits = field(default_factory=Limits)
    exporter: ExporterSettings = field(default_factory=ExporterSettings)
    stop: StopSettings = field(default_factory=StopSettings)
    detectors: dict[str, Any] = field(default_factory=default_detector_settings)
    webhooks: list[WebhookSettings] = field(default_factory=list)  # --webhook URLs, then [[webhooks]]
    alertmanager: AlertmanagerSettings | None = None

    def __post_init__(self) -> None:
        """Delivery targets not given are built from ``server`` (``--webhook``, ``--alertmanager``), so a
        Settings built in code gets them too."""
        if not self.webhooks:
            self.webhooks = webhook_settings({}, self.server)
        if self.alertmanager is None:
            self.alertmanager = alertmanager_settings({}, self.server)


def detector_settings(table: Any) -> dict[str, Any]:
    if not isinstance(table, Mapping):
        raise ConfigError(f"detectors: must be a table, got {table!r:.80}")
    out = default_detector_settings()
    by_name = {d.name: d for d in detectors.ALL}
    for name, values in table.items():
        if name not in by_name:
            raise ConfigError(f"detectors.{name}: unknown detector (known: {', '.join(sorted(by_name))})")
        out[name] = build(by_name[name].Settings, f"detectors.{name}", values)
    return out


def webhook_settings(doc: Mapping[str, Any], server: ServerSettings) -> list[WebhookSettings]:
    """``--webhook`` URLs (or ``[server] webhooks``) and ``[[webhooks]]`` tables; names made unique."""
    tables = doc.get("webhooks", [])
    if not isinstance(tables, list) or not all(isinstance(t, Mapping) for t in tables):
        raise ConfigError(f"webhooks: must be an array of tables ([[webhooks]]), got {tables!r:.80}")
    out = [WebhookSettings(url=url) for url in server.webhooks]
    out += [build(WebhookSettings, f"webhooks[{i}]", t) for i, t in enumerate(tables)]
    urls = [w.url for w in out]
    for url in urls:
        if urls.count(url) > 1:
            raise ConfigError(f"webhooks: {rules.redacted(url)!r} is configured twice; give it one entry")
    seen: set[str] = set()
    for w in out:
        base = w.name or urlsplit(w.url).netloc.rpartition("@")[2]  # never its user:password
        name, n = base, 1
        while name in seen:
            n += 1
            name = f"{base}#{n}"
        seen.add(name)
        w.name = name
    return out


def alertmanager_settings(doc: Mapping[str, Any], server: ServerSettings) -> AlertmanagerSettings | None:
    """``--alertmanager URL`` (or TRAINHEALTH_ALERTMANAGER) wins over ``[alertmanager] url``."""
    table = doc.get("alertmanager", {})
    if not isinstance(table, Mapping):
        raise ConfigError(f"alertmanager: must be a table, got {table!r:.80}")
    table = dict(table)
    if server.alertmanager:
        table["url"] = server.alertmanager
    if not table:
        return None
    result: AlertmanagerSettings = build(AlertmanagerSettings, "alertmanager", table)
    return result


def read_toml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {path} is not valid TOML: {exc}") from None


ENV_PREFIX = "TRAINHEALTH_"
# flag name -> (type, is a list)
SERVER_KEYS: dict[str, tuple[type, bool]] = {
    "host": (str, False), "port": (int, False), "webhooks": (str, True),
    "alertmanager": (str, False), "db": (str, False), "record_dir": (str, False),
    "token": (str, False), "tick_seconds": (float, False), "allowed_hosts": (str, True),
}
ENV_NAMES = {"webhooks": "WEBHOOK", "record_dir": "RECORD"}


def load(config_file: str | None = None, flags: Mapping[str, Any] | None = None,
         environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from TOML file, environment and flags (flags win), every section checked.

    Raises ConfigError (one line: dotted key, rule, value) for the first bad value; a reload runs this same
    function, so what a start would refuse a reload refuses too.
    """
    environ = environ if environ is not None else {}
    flags = {k: v for k, v in (flags or {}).items() if v is not None and v != []}
    config_file = config_file or environ.get(ENV_PREFIX + "CONFIG")
    doc = read_toml(config_file) if config_file else {}
    for section in doc:
        if section not in SECTIONS:
            raise ConfigError(f"{section}: unknown section (known: {', '.join(SECTIONS)})")
    table = doc.get("server", {})
    if not isinstance(table, Mapping):
        raise ConfigError(f"server: must be a table, got {table!r:.80}")
    server: dict[str, Any] = dict(table)
    for key, (typ, is_list) in SERVER_KEYS.items():
        env_name = ENV_PREFIX + ENV_NAMES.get(key, key.upper())
        if env_name in environ and environ[env_name] != "":
            raw = environ[env_name]
            try:
                server[key] = [u for u in raw.split(",") if u] if is_list else typ(raw)
            except ValueError:
                raise ConfigError(f"{env_name}: expected {typ.__name__}, got {raw!r}") from None
        if key in flags:
            server[key] = flags[key]
    server_settings: ServerSettings = build(ServerSettings, "server", server)
    limits: Limits = build(Limits, "limits", doc.get("limits", {}))
    detector_table = detector_settings(doc.get("detectors", {}))
    webhooks = webhook_settings(doc, server_settings)
    alertmanager = alertmanager_settings(doc, server_settings)
    node = environ.get(ENV_PREFIX + "NODE", "")
    if alertmanager is not None and node and "node" not in doc.get("alertmanager", {}):
        # one sidecar per node: TRAINHEALTH_NODE (the name its ranks report) labels its pushes
        alertmanager = dataclasses.replace(alertmanager, node=node)
    exporter: ExporterSettings = build(ExporterSettings, "exporter", doc.get("exporter", {}))
    stop: StopSettings = build(StopSettings, "stop", doc.get("stop", {}))
    return Settings(server=server_settings, limits=limits, exporter=exporter, stop=stop, detectors=detector_table,
                    webhooks=webhooks, alertmanager=alertmanager)
