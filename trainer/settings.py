"""The client's settings, and the one place that reads the environment.

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``TORCHELASTIC_RUN_ID``; trainhealth's own
variables are ``TRAINHEALTH_URL``, ``TRAINHEALTH_RUN`` (overrides the run name),
``TRAINHEALTH_TOKEN``, ``TRAINHEALTH_OFFLINE`` (write a .jsonl instead of sending),
``TRAINHEALTH_HEARTBEAT_SECONDS``, ``TRAINHEALTH_FLUSH_SECONDS``, ``TRAINHEALTH_SAMPLE_SECONDS``
(host PSS and NVML) and ``TRAINHEALTH_HOST`` (the host name the start record carries; default the
machine's, so one machine can stand for two in a test).
"""

from __future__ import annotations

import logging
import os
import re
import socket
from dataclasses import dataclass, fields
from typing import Any, Mapping

log = logging.getLogger("trainhealth.trainer")

DEFAULT_URL = "http://127.0.0.1:9464"
RUN_RE = re.compile(r"\A(?!\.+\Z)[A-Za-z0-9._:-]{1,128}\Z")  # not only dots: the sidecar refuses those
_RUN_BAD_CHARS = re.compile(r"[^A-Za-z0-9._:-]")


@dataclass(kw_only=True, slots=True)
class ClientSettings:
    url: str = DEFAULT_URL
    run: str = "local"
    rank: int = 0
    world_size: int = 1
    token: str | None = None
    offline_path: str | None = None  # may contain {rank} and {run}
    capacity: int = 10_000  # records buffered at most; beyond, the oldest are dropped
    batch_records: int = 500  # records per POST at most; a full batch is sent at once
    flush_seconds: float = 1.0  # otherwise send what is there this often
    heartbeat_seconds: float = 5.0
    timeout_seconds: float = 5.0  # per HTTP request
    backoff_seconds: float = 0.5  # first retry delay after a failed send; doubles
    max_backoff_seconds: float = 10.0
    sample_seconds: float = 5.0  # host PSS and NVML are read this often (background thread)
    host: str = ""  # the start record's host (groups ranks by machine); "" = socket.gethostname()
    poll_seconds: float = 0.005  # while device values are on their way, look for finished copies this often
    crash_flush_seconds: float = 2.0  # a crash's end record: how long the dying process waits for it to leave

    def __post_init__(self) -> None:
        if not RUN_RE.match(self.run):
            raise ValueError(f"run: must be 1-128 chars of [A-Za-z0-9._:-], not only dots, got {self.run!r}")
        if self.rank < 0:
            raise ValueError(f"rank: must be >= 0, got {self.rank}")
        if self.world_size < 1:
            raise ValueError(f"world_size: must be >= 1, got {self.world_size}")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url: must start with http:// or https://, got {self.url!r}")
        for name in ("capacity", "batch_records"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("flush_seconds", "heartbeat_seconds", "timeout_seconds", "backoff_seconds",
                     "max_backoff_seconds", "sample_seconds", "poll_seconds", "crash_flush_seconds"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name}: must be > 0, got {value!r}")


def sanitize_run(name: str) -> str:
    """A run name the sidecar accepts: invalid characters become '-', at most 128 chars."""
    name = _RUN_BAD_CHARS.sub("-", name)[:128]
    return name if name.strip(".") else "local"  # "", ".", "..": not a run name


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        log.warning("trainhealth: ignoring %s=%r (not an integer); using %d", name, raw, default)
        return default


def _env_float(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0:
        log.warning("trainhealth: ignoring %s=%r (not a positive number); using %g", name, raw, default)
        return default
    return value


def from_environ(environ: Mapping[str, str] | None = None, **overrides: Any) -> ClientSettings:
    """Settings from the environment; explicit arguments (not None) win."""
    env = os.environ if environ is None else environ
    run = (env.get("TRAINHEALTH_RUN") or env.get("TORCHELASTIC_RUN_ID")
           or f"{socket.gethostname()}-{os.getpid()}")
    values: dict[str, Any] = {
        "url": (env.get("TRAINHEALTH_URL") or DEFAULT_URL).rstrip("/"),
        "run": sanitize_run(run),
        "rank": _env_int(env, "RANK", 0),
        "world_size": _env_int(env, "WORLD_SIZE", 1),
        "token": env.get("TRAINHEALTH_TOKEN") or None,
        "offline_path": env.get("TRAINHEALTH_OFFLINE") or None,
        "heartbeat_seconds": _env_float(env, "TRAINHEALTH_HEARTBEAT_SECONDS", 5.0),
        "flush_seconds": _env_float(env, "TRAINHEALTH_FLUSH_SECONDS", 1.0),
        "sample_seconds": _env_float(env, "TRAINHEALTH_SAMPLE_SECONDS", 5.0),
        "host": env.get("TRAINHEALTH_HOST") or socket.gethostname(),
    }
    known = {f.name for f in fields(ClientSettings)}
    for key, value in overrides.items():
        if key not in known:
            raise TypeError(f"unknown setting {key!r}")
        if value is not None:
            values[key] = value
    if isinstance(values["url"], str):
        values["url"] = values["url"].rstrip("/")
    return ClientSettings(**values)
