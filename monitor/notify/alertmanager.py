"""Push to a real Alertmanager (its v2 API, ``POST /api/v2/alerts``), so teams route, group and silence there.

Labels: ``alertname``, ``run``, ``rank`` (absent for run-wide alerts),
``severity``, ``source="trainhealth"``, and ``node`` with ``[alertmanager] node`` set (one sidecar per
node: two nodes' run-wide alerts of one run would otherwise be one alert); annotations: ``summary``, ``step``.
New transitions go through the outbox (firing, then resolved with ``endsAt``);
while nothing is queued, the open alerts are re-sent every ``resend_seconds``
with ``endsAt`` = now + 4 x resend_seconds, as Prometheus does, so Alertmanager
keeps them firing while the sidecar lives and lets them lapse if it dies.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from typing import Any, Callable

from .. import jsonout
from ..alerts import Alert
from ..config import AlertmanagerSettings
from .delivery import Target

SOURCE = "trainhealth"
ZERO_TIME = "0001-01-01T00:00:00Z"  # what Alertmanager writes for "no end"


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def labels(alert: Alert) -> dict[str, str]:
    out = {"alertname": alert["alert"], "run": alert["run"], "severity": alert["severity"], "source": SOURCE}
    if alert["rank"] is not None:
        out["rank"] = str(alert["rank"])
    return out


def summary_annotations(alert: Alert) -> dict[str, str]:
    return {"summary": alert["summary"], "step": str(alert["step"])}


def label_fingerprint(alert: Alert) -> str:
    """A 16-hex id of the label set, like Alertmanager's own."""
    return hashlib.sha256(alert["fingerprint"].encode()).hexdigest()[:16]


def postable(alerts: list[Alert], now: float, resend_seconds: float, node: str = "") -> list[dict[str, Any]]:
    """Alertmanager v2 ``postableAlerts``. Times use the sidecar's wall clock where records may be skewed."""
    out = []
    for a in alerts:
        starts = min(float(a["started_at"]), now)
        ends = now + 4 * resend_seconds if a["state"] == "firing" else max(now, starts)
        names = labels(a)
        if node:
            names["node"] = node
        out.append({"labels": names, "annotations": summary_annotations(a),
                    "startsAt": rfc3339(starts), "endsAt": rfc3339(ends)})
    return out


def target(s: AlertmanagerSettings, open_alerts: Callable[[], list[Alert]]) -> Target:
    def render(alerts: list[Alert], now: float) -> bytes:
        return jsonout.dumpb(postable(alerts, now, s.resend_seconds, s.node))

    return Target(key=f"alertmanager {s.url}", name="alertmanager", kind="alertmanager",
                  url=s.url.rstrip("/") + "/api/v2/alerts", render=render, refresh=open_alerts,
                  refresh_seconds=s.resend_seconds, retry=s)
