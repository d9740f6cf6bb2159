"""The sidecar's console: one line per alert transition, so ``trainhealth serve`` in a terminal shows them.

    ALERT firing critical nan_divergence run=demo rank=1 step=812: loss became NaN at step 812 on rank 1; ...

Firing critical alerts log at WARNING, everything else at INFO (``--log-level warning`` keeps the pages only).
"""

from __future__ import annotations

import logging

from ..alerts import Alert

log = logging.getLogger("trainhealth.alerts")


def line(alert: Alert) -> str:
    rank = "-" if alert.get("rank") is None else alert["rank"]
    summary = " ".join(str(alert.get("summary", "")).split())  # one line, whatever the summary holds
    return (f"ALERT {alert['state']} {alert['severity']} {alert['alert']} run={alert['run']} rank={rank} "
            f"step={alert.get('step')}: {summary}")


def log_alerts(alerts: list[Alert]) -> None:
    """An alert sink (Service.sinks)."""
    for alert in alerts:
        critical = alert["state"] == "firing" and alert["severity"] == "critical"
        log.log(logging.WARNING if critical else logging.INFO, "%s", line(alert))
