"""Settings: one dataclass per component, and the one loader that fills them.

Precedence: command-line flag > ``TRAINHEALTH_*`` environment variable >
TOML file (``--config``) > default. Detector thresholds live in the TOML file
under ``[detectors.NAME]`` and can be reloaded (SIGHUP, ``POST /-/reload``).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .detectors import ALL

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A bad setting; the message names the key and the value."""


@dataclass(kw_only=True, slots=True)
class Limits:
    """Caps that keep one sidecar bounded whatever its clients send."""

    max_body_bytes: int = 16 << 20  # as sent (maybe gzip)
    max_decoded_bytes: int = 64 << 20  # after gunzip
    max_records_per_batch: int = 20_000
    max_runs: int = 256
    max_ranks_per_run: int = 4096
    run_ttl_seconds: float = 6 * 3600.0  # an ended or silent run is forgotten after this
    max_future_seconds: float = 3600.0  # serve: a record timed further ahead of the sidecar's clock is refused

    def __post_init__(self) -> None:
        require_positive("limits", self, tuple(f.name for f in dataclasses.fields(self)))


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

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"port: must be 0-65535, got {self.port!r}")
        require_positive("server", self, ("state_snapshot_seconds", "max_connections", "keep_alive_seconds",
                                          "header_timeout_seconds"))
        if not isinstance(self.tick_seconds, (int, float)) or self.tick_seconds <= 0:
            raise ConfigError(f"tick_seconds: must be > 0, got {self.tick_seconds!r}")
        for url in self.webhooks + ([self.alertmanager] if self.alertmanager else []):
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise ConfigError(f"webhook: must be an http(s) URL, got {url!r}")


def default_detector_settings() -> dict[str, Any]:
    return {d.name: d.Settings() for d in ALL}


@dataclass(kw_only=True, slots=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    limits: Limits = field(default_factory=Limits)
    detectors: dict[str, Any] = field(default_factory=default_detector_settings)
    raw: dict[str, Any] = field(default_factory=dict)  # the whole TOML, for later components


def require_positive(section: str, obj: Any, keys: tuple[str, ...]) -> None:
    """For a component's Settings.__post_init__: each key a positive number, else a ConfigError naming it."""
    for key in keys:
        value = getattr(obj, key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{section}.{key}: must be a positive number, got {value!r}")


def _build(cls: type, section: str, values: Mapping[str, Any]) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(f"[{section}]: must be a table, got {values!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise ConfigError(f"{section}.{key}: unknown setting (known: {', '.join(sorted(known))})")
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"[{section}]: {exc}") from None


def detector_settings(table: Mapping[str, Any]) -> dict[str, Any]:
    out = default_detector_settings()
    by_name = {d.name: d for d in ALL}
    for name, values in table.items():
        if name not in by_name:
            raise ConfigError(f"detectors.{name}: unknown detector (known: {', '.join(sorted(by_name))})")
        out[name] = _build(by_name[name].Settings, f"detectors.{name}", values)
    return out


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
    """Settings from TOML file, environment and flags (flags win)."""
    environ = environ if environ is not None else {}
    flags = {k: v for k, v in (flags or {}).items() if v is not None and v != []}
    config_file = config_file or environ.get(ENV_PREFIX + "CONFIG")
    doc = read_toml(config_file) if config_file else {}
    server: dict[str, Any] = dict(doc.get("server", {}))
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
    return Settings(
        server=_build(ServerSettings, "server", server),
        limits=_build(Limits, "limits", doc.get("limits", {})),
        detectors=detector_settings(doc.get("detectors", {})),
        raw=doc,
    )


def reload_detectors(config_file: str | None) -> dict[str, Any]:
    """Only the detector thresholds, for a live reload."""
    doc = read_toml(config_file) if config_file else {}
    return detector_settings(doc.get("detectors", {}))
