"""Webhooks: where alert transitions are posted, with which filters, in which format.

``--webhook URL`` (repeatable) posts every transition in the ``trainhealth``
format; ``[[webhooks]]`` tables in the config file add filters and options::

    [[webhooks]]
    url = "https://hooks.example.com/trainhealth"
    format = "alertmanager"          # or "trainhealth" (default)
    severities = ["critical"]        # default: all
    alerts = ["nan_divergence", "gpu_oom"]   # default: all
    secret = "shared"                # adds X-Trainhealth-Signature: sha256=<hex HMAC of the body>
    send_resolved = true

Formats: ``trainhealth`` posts one DESIGN.md alert object per transition (plus
its stored ``id``); ``alertmanager`` posts what Alertmanager posts to its
webhook receivers (``version: "4"``, ``status``, ``alerts[]`` with labels,
annotations, startsAt, endsAt), one notification per (run, alert, state) in a
batch, so existing receivers work unchanged. Delivery is in delivery.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .. import jsonout
from ..alerts import Alert
from ..config import ConfigError, Settings, _build, require_positive
from .alertmanager import ZERO_TIME, label_fingerprint, labels, rfc3339, summary_annotations
from .delivery import Target

FORMATS = ("trainhealth", "alertmanager")
SEVERITIES = ("critical", "warning", "info")
RECEIVER = "trainhealth"


@dataclass(kw_only=True, slots=True)
class WebhookSettings:
    url: str
    name: str | None = None  # label in logs and metrics; default: host:port of the URL
    format: str = "trainhealth"
    severities: list[str] | None = None  # None: all
    alerts: list[str] | None = None  # None: all
    secret: str | None = None
    send_resolved: bool = True
    timeout: float = 10.0
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    give_up_after: float = 86400.0

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"webhooks.url: must be an http(s) URL, got {self.url!r}")
        if self.format not in FORMATS:
            raise ConfigError(f"webhooks.format: must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.severities is not None and (not isinstance(self.severities, list)
                                            or any(s not in SEVERITIES for s in self.severities)):
            raise ConfigError(f"webhooks.severities: must be a list of {', '.join(SEVERITIES)}, "
                              f"got {self.severities!r}")
        if self.alerts is not None and (not isinstance(self.alerts, list)
                                        or not all(isinstance(a, str) for a in self.alerts)):
            raise ConfigError(f"webhooks.alerts: must be a list of alert names, got {self.alerts!r}")
        if self.secret is not None and (not isinstance(self.secret, str) or not self.secret):
            raise ConfigError("webhooks.secret: must be a non-empty string")
        require_positive("webhooks", self, ("timeout", "backoff_initial", "backoff_max", "give_up_after"))

    def accepts(self, alert: Alert) -> bool:
        return ((self.send_resolved or alert["state"] == "firing")
                and (self.severities is None or alert["severity"] in self.severities)
                and (self.alerts is None or alert["alert"] in self.alerts))


def webhook_settings(settings: Settings) -> list[WebhookSettings]:
    """``--webhook`` URLs (or ``[server] webhooks``) and ``[[webhooks]]`` tables; names made unique."""
    tables = settings.raw.get("webhooks", [])
    if not isinstance(tables, list) or not all(isinstance(t, Mapping) for t in tables):
        raise ConfigError(f"webhooks: must be an array of tables ([[webhooks]]), got {tables!r:.80}")
    out = [WebhookSettings(url=url) for url in settings.server.webhooks]
    out += [_build(WebhookSettings, f"webhooks[{i}]", t) for i, t in enumerate(tables)]
    urls = [w.url for w in out]
    for url in urls:
        if urls.count(url) > 1:
            raise ConfigError(f"webhooks: {url!r} is configured twice; give it one entry")
    seen: set[str] = set()
    for w in out:
        base = w.name or urlsplit(w.url).netloc
        name, n = base, 1
        while name in seen:
            n += 1
            name = f"{base}#{n}"
        seen.add(name)
        w.name = name
    return out


def alertmanager_payload(alerts: list[Alert]) -> dict[str, Any]:
    """One notification as Alertmanager's webhook receiver sends it (all alerts share run, alert, state)."""
    items: list[dict[str, Any]] = []
    for a in alerts:
        items.append({
            "status": a["state"], "labels": labels(a), "annotations": summary_annotations(a),
            "startsAt": rfc3339(float(a["started_at"])),
            "endsAt": rfc3339(float(a["time"])) if a["state"] == "resolved" else ZERO_TIME,
            "generatorURL": "", "fingerprint": label_fingerprint(a),
        })
    common_labels = _common([i["labels"] for i in items])
    group = {"alertname": alerts[0]["alert"], "run": alerts[0]["run"]}
    return {
        "version": "4",
        "groupKey": "{}:{" + ", ".join(f'{k}="{v}"' for k, v in group.items()) + "}",
        "truncatedAlerts": 0,
        "status": alerts[0]["state"],
        "receiver": RECEIVER,
        "groupLabels": group,
        "commonLabels": common_labels,
        "commonAnnotations": _common([i["annotations"] for i in items]),
        "externalURL": "",
        "alerts": items,
    }


def _common(maps: list[dict[str, str]]) -> dict[str, str]:
    first = maps[0]
    return {k: v for k, v in first.items() if all(m.get(k) == v for m in maps[1:])}


def _by_group(alerts: list[Alert]) -> list[list[Alert]]:
    groups: dict[tuple[str, str, str], list[Alert]] = {}
    for a in alerts:
        groups.setdefault((a["run"], a["alert"], a["state"]), []).append(a)
    return list(groups.values())


def _one_each(alerts: list[Alert]) -> list[list[Alert]]:
    return [[a] for a in alerts]


def _render_trainhealth(alerts: list[Alert], now: float) -> bytes:
    return jsonout.dumpb(alerts[0])


def _render_alertmanager(alerts: list[Alert], now: float) -> bytes:
    return jsonout.dumpb(alertmanager_payload(alerts))


def target(w: WebhookSettings) -> Target:
    am = w.format == "alertmanager"
    return Target(key=f"webhook {w.url}", name=w.name or urlsplit(w.url).netloc, kind="webhook", url=w.url,
                  render=_render_alertmanager if am else _render_trainhealth, accepts=w.accepts,
                  split=_by_group if am else _one_each, secret=w.secret, timeout=w.timeout,
                  backoff_initial=w.backoff_initial, backoff_max=w.backoff_max, give_up_after=w.give_up_after)
