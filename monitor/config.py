"""Settings: one dataclass per component, and the one loader that fills them.

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

from .detectors import ALL, validate
from .detectors.validate import ConfigError, build
from .metrics.collector import exporter_settings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["ConfigError", "Limits", "ServerSettings", "Settings", "RetryPolicy", "WebhookSettings",
           "AlertmanagerSettings", "load", "read_toml", "detector_settings", "build"]

_build = build  # the name metrics/collector.py imports

# Every top-level table the file may hold; anything else is a typo (``[detector.rank_stalled]``) that would
# otherwise silently leave every threshold at its default.
SECTIONS = ("server", "limits", "detectors", "webhooks", "alertmanager", "exporter")


@dataclass(kw_only=True, slots=True)
class Limits:
    """Caps that keep one sidecar bounded whatever its clients send."""

    max_body_bytes: int = 16 << 20  # as sent (maybe gzip)
    max_decoded_bytes: int = 64 << 20  # after gunzip
    max_records_per_batch: int = 20_000
    max_values_per_batch: int = 500_000  # commas, '[', '{' and line ends in a decoded body: bounds its memory
    max_text_bytes: int = 64 << 20  # OOM details and start configs kept by all runs together (textbudget.py)
    max_runs: int = 256
    max_ranks_per_run: int = 4096
    run_ttl_seconds: float = 6 * 3600.0  # an ended or silent run is forgotten after this
    max_future_seconds: float = 3600.0  # serve: a record timed further ahead of the sidecar's clock is refused

    def __post_init__(self) -> None:
        validate.positive(self, "limits", *(f.name for f in dataclasses.fields(self)))


@dataclass(kw_only=True, slots=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 9464
    webhooks: list[str] = field(default_factory=list)
    alertmanager: str | None = None
    db: str = "./trainhealth.db"
    record_dir: str | None = None
    record_max_bytes: int = 256 << 20  # per run file before rotation
    token: str | None = None
    tick_seconds: float = 1.0
    state_snapshot_seconds: float = 30.0  # pipeline state to --db (checkpoint.py); a restart replays the rest
    max_connections: int = 4096  # open HTTP connections; at the cap the longest-idle one is closed
    keep_alive_seconds: float = 15.0  # an idle keep-alive connection is closed after this
    header_timeout_seconds: float = 10.0  # a connection that has not sent a request's headers is closed after this
    body_timeout_seconds: float = 30.0  # a request whose body is not complete this long after its headers: 408

    def __post_init__(self) -> None:
        validate.whole(self, "server", "port", minimum=0, maximum=65535)
        validate.positive(self, "server", "tick_seconds")
        validate.whole(self, "server", "record_max_bytes", minimum=1)
        validate.positive(self, "server", "state_snapshot_seconds", "keep_alive_seconds", "header_timeout_seconds",
                          "body_timeout_seconds")
        validate.whole(self, "server", "max_connections", minimum=1)
        for i, url in enumerate(self.webhooks):
            if not validate.is_url(url):
                raise ConfigError(f"server.webhooks[{i}]: must be an http(s) URL, got {validate.redacted(url)!r}")
        if self.alertmanager is not None:
            validate.url(self, "server", "alertmanager")


@dataclass(kw_only=True, slots=True)
class RetryPolicy:
    """How one notification target is posted to: the one retry policy of webhooks and Alertmanager.

    Each attempt waits ``timeout``; a retryable failure (no answer, 408/425/429, 5xx) backs off
    exponentially from ``backoff_initial`` to ``backoff_max``; a notification still failing after
    ``give_up_after`` seconds is kept as undelivered (``GET /v1/alerts``, redeliver).
    """

    url: str
    timeout: float = 10.0
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    give_up_after: float = 86400.0

    def __post_init__(self) -> None:
        validate.url(self, self._section(), "url")
        validate.positive(self, self._section(), "timeout", "backoff_initial", "backoff_max", "give_up_after")

    def _section(self) -> str:
        return "webhooks"


FORMATS = ("trainhealth", "alertmanager")
SEVERITIES = ("critical", "warning", "info")


@dataclass(kw_only=True, slots=True)
class WebhookSettings(RetryPolicy):
    """One ``[[webhooks]]`` table (or a ``--webhook URL``)."""

    name: str | None = None  # label in logs and metrics; default: host:port of the URL
    format: str = "trainhealth"
    severities: list[str] | None = None  # None: all
    alerts: list[str] | None = None  # None: all
    secret: str | None = None
    send_resolved: bool = True

    def __post_init__(self) -> None:
        RetryPolicy.__post_init__(self)
        validate.one_of(self, "webhooks", "format", FORMATS)
        if self.severities is not None and any(s not in SEVERITIES for s in self.severities):
            raise ConfigError(f"webhooks.severities: must be a list of {', '.join(SEVERITIES)}, "
                              f"got {self.severities!r}")
        if self.secret is not None and not self.secret:
            raise ConfigError("webhooks.secret: must be a non-empty string, got ''")
        validate.flag(self, "webhooks", "send_resolved")


@dataclass(kw_only=True, slots=True)
class AlertmanagerSettings(RetryPolicy):
    """``[alertmanager]``; ``url`` is the base URL, e.g. http://alertmanager:9093."""

    resend_seconds: float = 60.0

    def __post_init__(self) -> None:
        RetryPolicy.__post_init__(self)
        validate.positive(self, "alertmanager", "resend_seconds")

    def _section(self) -> str:
        return "alertmanager"


def default_detector_settings() -> dict[str, Any]:
    return {d.name: d.Settings() for d in ALL}


@dataclass(kw_only=True, slots=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    limits: Limits = field(default_factory=Limits)
    detectors: dict[str, Any] = field(default_factory=default_detector_settings)
    webhooks: list[WebhookSettings] = field(default_factory=list)  # --webhook URLs, then [[webhooks]]
    alertmanager: AlertmanagerSettings | None = None
    raw: dict[str, Any] = field(default_factory=dict)  # the whole TOML, for later components

    def __post_init__(self) -> None:
        """Delivery targets not given are built from ``server`` (``--webhook``, ``--alertmanager``) and
        ``raw`` (``[[webhooks]]``, ``[alertmanager]``), so a Settings built in code gets them too."""
        if not self.webhooks:
            self.webhooks = webhook_settings(self.raw, self.server)
        if self.alertmanager is None:
            self.alertmanager = alertmanager_settings(self.raw, self.server)


def detector_settings(table: Any) -> dict[str, Any]:
    if not isinstance(table, Mapping):
        raise ConfigError(f"detectors: must be a table, got {table!r:.80}")
    out = default_detector_settings()
    by_name = {d.name: d for d in ALL}
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
            raise ConfigError(f"webhooks: {validate.redacted(url)!r} is configured twice; give it one entry")
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
    "token": (str, False), "tick_seconds": (float, False),
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
    settings = Settings(
        server=server_settings,
        limits=build(Limits, "limits", doc.get("limits", {})),
        detectors=detector_settings(doc.get("detectors", {})),
        raw=doc,  # webhooks and alertmanager: built from it and server in Settings.__post_init__
    )
    exporter_settings(doc)  # [exporter] is checked at start and reload like every section
    return settings
