"""What goes on the wire: trainhealth and Alertmanager payloads, signatures, backoff, webhook settings."""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import random
from pathlib import Path

import pytest
from trainhealth.config import ConfigError, WebhookSettings, load
from trainhealth.notify.alertmanager import postable
from trainhealth.notify.delivery import backoff, outbox_rows, sign
from trainhealth.notify.webhooks import accepts, alertmanager_payload, target

FIRING = {"alert": "nan_divergence", "state": "firing", "severity": "critical", "run": "r1", "rank": 3,
          "step": 812, "time": 1_700_000_100.0, "summary": "loss became nan at step 812 on rank 3",
          "started_at": 1_700_000_100.0, "fingerprint": "r1/3/nan_divergence", "loss": math.nan, "id": 5}
RESOLVED = {**FIRING, "state": "resolved", "time": 1_700_000_160.0, "summary": "resolved", "id": 6}
RUN_WIDE = {**FIRING, "rank": None, "alert": "lr_scaling", "severity": "warning",
            "fingerprint": "r1/-/lr_scaling"}


def test_trainhealth_body_is_the_alert_object_with_nan_as_string() -> None:
    body = target(WebhookSettings(url="http://h/x")).render([FIRING], 0.0)
    assert json.loads(body) == {**FIRING, "loss": "NaN"}
    assert b"null" not in body


def test_alertmanager_webhook_payload_has_the_receiver_format() -> None:
    other_rank = {**FIRING, "rank": 4, "fingerprint": "r1/4/nan_divergence", "summary": "other"}
    p = alertmanager_payload([FIRING, other_rank])
    assert p["version"] == "4" and p["status"] == "firing" and p["truncatedAlerts"] == 0
    assert p["groupKey"] == '{}:{alertname="nan_divergence", run="r1"}'
    assert p["groupLabels"] == {"alertname": "nan_divergence", "run": "r1"}
    assert p["commonLabels"] == {"alertname": "nan_divergence", "run": "r1", "severity": "critical",
                                 "source": "trainhealth"}
    assert p["commonAnnotations"] == {"step": "812"}
    first = p["alerts"][0]
    assert first["labels"]["rank"] == "3"
    assert first["annotations"]["summary"] == "loss became nan at step 812 on rank 3"
    assert first["startsAt"] == "2023-11-14T22:15:00.000Z"
    assert first["endsAt"] == "0001-01-01T00:00:00Z"
    assert len(first["fingerprint"]) == 16 and first["fingerprint"] != p["alerts"][1]["fingerprint"]


def test_alertmanager_webhook_resolved_carries_ends_at() -> None:
    p = alertmanager_payload([RESOLVED])
    assert p["status"] == "resolved"
    assert p["alerts"][0]["endsAt"] == "2023-11-14T22:16:00.000Z"


def test_alertmanager_webhook_batches_one_notification_per_run_alert_and_state() -> None:
    t = target(WebhookSettings(url="http://h/x", format="alertmanager"))
    other_rank = {**FIRING, "rank": 4, "fingerprint": "r1/4/nan_divergence"}
    rows = outbox_rows([t], [FIRING, other_rank, RUN_WIDE, RESOLVED])
    groups = [json.loads(payload) for _, _, payload in rows]
    assert [[(a["alert"], a["rank"], a["state"]) for a in g] for g in groups] == [
        [("nan_divergence", 3, "firing"), ("nan_divergence", 4, "firing")],
        [("lr_scaling", None, "firing")],
        [("nan_divergence", 3, "resolved")],
    ]
    assert len({key for _, key, _ in rows}) == 3


def test_alertmanager_api_alert_labels_and_times() -> None:
    now = 1_700_000_200.0
    firing, run_wide, done = postable([FIRING, RUN_WIDE, RESOLVED], now, resend_seconds=60)
    assert firing["labels"] == {"alertname": "nan_divergence", "run": "r1", "rank": "3",
                                "severity": "critical", "source": "trainhealth"}
    assert firing["endsAt"] == "2023-11-14T22:20:40.000Z"  # now + 4 x resend: lapses if we die
    assert "rank" not in run_wide["labels"]
    assert done["endsAt"] == "2023-11-14T22:16:40.000Z"  # resolved: ends now (wall clock)
    future = postable([{**FIRING, "started_at": now + 500}], now, 60)[0]
    assert future["startsAt"] == "2023-11-14T22:16:40.000Z"  # a skewed record clock never starts later


def test_signature_is_hmac_sha256_of_the_exact_body() -> None:
    body = b'{"alert":"nan_divergence"}'
    expected = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert sign("s3cret", body) == f"sha256={expected}"


def test_backoff_grows_exponentially_with_jitter_and_is_capped() -> None:
    rng = random.Random(1)
    cases = ((1, 0.5, 1.0), (2, 1.0, 2.0), (4, 4.0, 8.0), (10, 30.0, 60.0), (500, 30.0, 60.0))
    for attempts, lo, hi in cases:
        delays = [backoff(attempts, 1.0, 60.0, rng) for _ in range(50)]
        assert all(lo <= d <= hi for d in delays), (attempts, delays)
        assert len(set(delays)) > 1


def test_filters_pick_which_transitions_a_webhook_gets() -> None:
    crit = WebhookSettings(url="http://h/crit", severities=["critical"], send_resolved=False)
    lr = WebhookSettings(url="http://h/lr", alerts=["lr_scaling"])
    assert [accepts(crit, a) for a in (FIRING, RUN_WIDE, RESOLVED)] == [True, False, False]
    assert [accepts(lr, a) for a in (FIRING, RUN_WIDE, RESOLVED)] == [False, True, False]
    rows = outbox_rows([target(crit), target(lr)], [FIRING, RUN_WIDE, RESOLVED])
    assert [(t, json.loads(p)[0]["alert"]) for t, _, p in rows] == [
        ("webhook http://h/crit", "nan_divergence"), ("webhook http://h/lr", "lr_scaling")]


def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return str(path)


def test_webhooks_come_from_flags_and_config_tables(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, """
[[webhooks]]
url = "https://hooks.example.com/T0/secret-path"
format = "alertmanager"
severities = ["critical", "warning"]
secret = "abc"

[alertmanager]
resend_seconds = 30
""")
    settings = load(cfg, {"webhooks": ["http://127.0.0.1:9000/a", "http://127.0.0.1:9000/b"],
                          "alertmanager": "http://am:9093"}, {})
    hooks = settings.webhooks
    assert [(w.url, w.name, w.format) for w in hooks] == [
        ("http://127.0.0.1:9000/a", "127.0.0.1:9000", "trainhealth"),
        ("http://127.0.0.1:9000/b", "127.0.0.1:9000#2", "trainhealth"),
        ("https://hooks.example.com/T0/secret-path", "hooks.example.com", "alertmanager"),
    ]
    assert hooks[2].secret == "abc" and hooks[2].severities == ["critical", "warning"]
    am = settings.alertmanager
    assert am is not None and (am.url, am.resend_seconds) == ("http://am:9093", 30)
    assert load(None, {}, {}).alertmanager is None


@pytest.mark.parametrize("table, message", [
    ('url = "ftp://x"', "webhooks[0].url: must be an http(s) URL, got 'ftp://x'"),
    ('url = "http://x"\nformat = "slack"', "webhooks[0].format: must be one of trainhealth, alertmanager, "
                                           "got 'slack'"),
    ('url = "http://x"\nseverities = ["page"]', "webhooks[0].severities: must be a list of critical, warning, "
                                                "info, got ['page']"),
    ('url = "http://x"\ntimeout = 0', "webhooks[0].timeout: must be a positive number, got 0"),
    ('url = "http://x"\nretries = 3', "webhooks[0].retries: unknown setting"),
])
def test_bad_webhook_settings_name_the_key_and_value(tmp_path: Path, table: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(write_config(tmp_path, "[[webhooks]]\n" + table + "\n"), {}, {})
    assert message in str(err.value)


def test_the_same_webhook_url_twice_is_refused(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, '[[webhooks]]\nurl = "http://h/x"\n')
    with pytest.raises(ConfigError, match="'http://h/x' is configured twice"):
        load(cfg, {"webhooks": ["http://h/x"]}, {})
