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

Formats: ``trainhealth`` posts one alert object (docs/alerts.md) per transition (plus
its stored ``id``); ``alertmanager`` posts what Alertmanager posts to its
webhook receivers (``version: "4"``, ``status``, ``alerts[]`` with labels,
annotations, startsAt, endsAt), one notification per (run, alert, state) in a
batch, so existing receivers work unchanged. Delivery is in delivery.py;
the settings (one retry policy for every target) are checked in config/sections.py.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from .. import jsonout
from ..alerts import Alert
from ..config import WebhookSettings
from .alertmanager import ZERO_TIME, label_fingerprint, labels, rfc3339, summary_annotations
from .delivery import Target

RECEIVER = "trainhealth"


def accepts(w: WebhookSettings, alert: Alert) -> bool:
    """The target's filters: severities, alert names, and whether resolves are sent."""
    return ((w.send_resolved or alert["state"] == "firing")
            and (w.severities is None or alert["severity"] in w.severities)
            and (w.alerts is None or alert["alert"] in w.alerts))


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
    name = w.name or urlsplit(w.url).netloc.rpartition("@")[2]  # never its user:password
    return Target(key=f"webhook {w.url}", name=name, kind="webhook", url=w.url,
                  render=_render_alertmanager if am else _render_trainhealth,
                  accepts=lambda alert: accepts(w, alert), split=_by_group if am else _one_each,
                  secret=w.secret, retry=w)
