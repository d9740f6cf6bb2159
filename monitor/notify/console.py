"""The sidecar's console: one line per alert transition, so ``trainhealth serve`` in a terminal shows them.

    ALERT firing critical nan_divergence run=demo rank=1 step=812: loss became NaN at step 812 on rank 1; ...

Firing critical alerts log at WARNING, everything else at INFO (``--log-level warning`` keeps the pages only).
An open alert refreshed in place (its incident's picture sharpened: a new root, more ranks) logs its new text
at INFO, so the console says what the API, the store and the page say:

    ALERT updated critical nan_divergence run=demo rank=- step=812: loss became nan at step 812 on rank 0; ...
"""

from __future__ import annotations

import logging

from ..alerts import Alert

log = logging.getLogger("trainhealth.alerts")


def line(alert: Alert, state: str | None = None) -> str:
    rank = "-" if alert.get("rank") is None else alert["rank"]
    summary = " ".join(str(alert.get("summary", "")).split())  # one line, whatever the summary holds
    return (f"ALERT {state or alert['state']} {alert['severity']} {alert['alert']} run={alert['run']} rank={rank} "
            f"step={alert.get('step')}: {summary}")


def log_alerts(alerts: list[Alert]) -> None:
    """An alert sink (Service.alert_sinks)."""
    for alert in alerts:
        critical = alert["state"] == "firing" and alert["severity"] == "critical"
        log.log(logging.WARNING if critical else logging.INFO, "%s", line(alert))


class ConsoleLog:
    """The console as an alert sink: transitions (``__call__``) and open alerts refreshed in place (``refresh``)."""

    def __call__(self, alerts: list[Alert]) -> None:
        log_alerts(alerts)

    def refresh(self, alerts: list[Alert]) -> None:
        for alert in alerts:
            log.info("%s", line(alert, "updated"))
