"""``trainhealth redeliver``: ask a running sidecar to send its undelivered notifications again.

A thin client of ``POST /v1/alerts/{id}/redeliver`` and ``POST /v1/alerts/redeliver[?target=]`` (the
sidecar owns the outbox; this never opens the SQLite file, so it is safe while the sidecar runs).
"""

from __future__ import annotations

import sys
from typing import Sequence

import httpx


def redeliver(url: str, alert_ids: Sequence[int], target: str | None, token: str | None) -> int:
    """Exit status: 0 when every request was taken, 1 otherwise (each answer is printed)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    paths = [f"/v1/alerts/{i}/redeliver" for i in alert_ids] or ["/v1/alerts/redeliver"]
    params = {"target": target} if target and not alert_ids else {}
    status = 0
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=30) as client:
        for path in paths:
            try:
                r = client.post(path, params=params)
            except httpx.HTTPError as exc:
                print(f"trainhealth redeliver: {url}{path}: {exc}", file=sys.stderr)
                return 1
            print(f"{path}: {r.status_code} {r.text}")
            status |= int(r.status_code != 200)
    return status
