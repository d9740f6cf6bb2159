"""The sidecar's own sections: ``[server]``, ``[limits]``, ``[exporter]``, ``[stop]``, ``[[webhooks]]``,
``[alertmanager]``.

Each is a ``kw_only, slots`` dataclass checked in ``__post_init__`` by the rules of rules.py, naming its keys
from its section (``server.port``); the detectors' sections live beside each detector.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from . import rules
from .rules import ConfigError


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
    # the bodies being received by every request together (http/bodies.py); None: 16 x max_body_bytes
    max_buffered_bytes: int | None = None

    def __post_init__(self) -> None:
        rules.positive(self, "limits", *(f.name for f in dataclasses.fields(self) if f.name != "max_buffered_bytes"))
        value = self.max_buffered_bytes
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < self.max_body_bytes):
            raise ConfigError(f"limits.max_buffered_bytes: must be an integer >= limits.max_body_bytes "
                              f"({self.max_body_bytes}, one whole body), got {value!r}")


HOST_NAME = re.compile(r"(\*|(\*\.)?[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?|\[[0-9A-Fa-f:.]+\])\Z")


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
    # Host names beyond localhost, addresses, the machine's name and host's (http/hosts.py); ["*"]: any
    allowed_hosts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        rules.whole(self, "server", "port", minimum=0, maximum=65535)
        rules.positive(self, "server", "tick_seconds")
        rules.whole(self, "server", "record_max_bytes", minimum=1)
        rules.positive(self, "server", "state_snapshot_seconds", "keep_alive_seconds", "header_timeout_seconds",
                       "body_timeout_seconds")
        rules.whole(self, "server", "max_connections", minimum=1)
        for i, url in enumerate(self.webhooks):
            if not rules.is_url(url):
                raise ConfigError(f"server.webhooks[{i}]: must be an http(s) URL, got {rules.redacted(url)!r}")
        if self.alertmanager is not None:
            rules.url(self, "server", "alertmanager")
        for i, name in enumerate(self.allowed_hosts):
            if not isinstance(name, str) or not HOST_NAME.match(name):
                raise ConfigError(f"server.allowed_hosts[{i}]: must be a host name without scheme or port "
                                  f"(sidecar, node-a.example.com, *.example.com) or \"*\", got {name!r}")


@dataclass(kw_only=True, slots=True)
class ExporterSettings:
    """``[exporter]``: what one scrape of /metrics shows (metrics/collector.py)."""

    max_series: int = 50_000  # per-rank series in one scrape; newest live runs first
    ended_run_seconds: float = 900.0  # an ended run is exported this long after its last record

    def __post_init__(self) -> None:
        rules.whole(self, "exporter", "max_series", minimum=1)
        value = self.ended_run_seconds  # inf is allowed: ended runs exported for as long as they are kept
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
            raise ConfigError(f"exporter.ended_run_seconds: must be a number >= 0, got {value!r}")


@dataclass(kw_only=True, slots=True)
class StopSettings:
    """``[stop]``: how far ahead of an alert the step every rank of the run stops after is fixed
    (stop_steps.py, docs/trainer.md): ``max(min_lead_steps, ceil(lead_seconds / step period))`` steps, at most
    ``max_lead_steps``. A larger ``lead_seconds`` gives a slow path to the farthest client (a loaded node, another
    network) time to hear the stop before it gets there; it costs that many more steps after the alert."""

    lead_seconds: float = 0.1
    min_lead_steps: int = 2
    max_lead_steps: int = 1000

    def __post_init__(self) -> None:
        rules.positive(self, "stop", "lead_seconds")
        rules.whole(self, "stop", "min_lead_steps", minimum=1)
        rules.whole(self, "stop", "max_lead_steps", minimum=1)
        rules.ordered(self, "stop", "max_lead_steps", ">=", self.min_lead_steps, "stop.min_lead_steps")


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
        rules.url(self, self._section(), "url")
        rules.positive(self, self._section(), "timeout", "backoff_initial", "backoff_max", "give_up_after")

    def _section(self) -> str:
        return "webhooks"


FORMATS = ("trainhealth", "alertmanager")
NODE_LABEL = re.compile(r"[A-Za-z0-9._:-]{0,128}\Z")
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
        rules.one_of(self, "webhooks", "format", FORMATS)
        if self.severities is not None and any(s not in SEVERITIES for s in self.severities):
            raise ConfigError(f"webhooks.severities: must be a list of {', '.join(SEVERITIES)}, "
                              f"got {self.severities!r}")
        if self.secret is not None and not self.secret:
            raise ConfigError("webhooks.secret: must be a non-empty string, got ''")
        rules.flag(self, "webhooks", "send_resolved")


@dataclass(kw_only=True, slots=True)
class AlertmanagerSettings(RetryPolicy):
    """``[alertmanager]``; ``url`` is the base URL, e.g. http://alertmanager:9093."""

    resend_seconds: float = 60.0
    node: str = ""  # a ``node`` label on every alert pushed (one sidecar per node: whose alert it is)

    def __post_init__(self) -> None:
        RetryPolicy.__post_init__(self)
        rules.positive(self, "alertmanager", "resend_seconds")
        if not isinstance(self.node, str) or not NODE_LABEL.match(self.node):
            raise ConfigError(f"alertmanager.node: must be 0-128 characters of [A-Za-z0-9._:-], got {self.node!r}")

    def _section(self) -> str:
        return "alertmanager"
