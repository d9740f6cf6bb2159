"""The alert contract as a type (alerts.Alert): what the book makes, what the store keeps."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from trainhealth.alerts import Alert, AlertBook, AlertFields, extra
from trainhealth.events import firing, resolved
from trainhealth.notify.store import ALERT_COLUMNS, Store


def test_a_transition_carries_every_required_field_and_the_detectors_own() -> None:
    book = AlertBook()
    event = firing("nan_divergence", 3, 10, 5.0, "loss became NaN", "critical", first_rank=3)
    event.data["summary"] = "not this one"
    [fired] = book.apply("job", [event])
    assert set(fired) == Alert.__required_keys__ | {"first_rank"}
    assert extra(fired)["first_rank"] == 3
    assert fired["summary"] == "loss became NaN"  # Event.data never overwrites a contract field
    book.apply("job", [firing("nan_divergence", 3, 11, 6.0, "again")])
    held = book.open[("job", 3, "nan_divergence")]
    assert (held["last_step"], held["last_time"]) == (11, 6.0)  # optional fields, set later on the book's own
    assert "last_step" not in fired  # the caller's copy is as it was made
    [closed] = book.apply("job", [resolved("nan_divergence", 3, 12, 7.0)])
    assert set(closed) == Alert.__required_keys__
    assert (closed["severity"], closed["started_at"]) == ("critical", 5.0)


def test_required_fields_are_what_design_md_lists_plus_started_at_and_fingerprint() -> None:
    assert Alert.__required_keys__ == set(AlertFields.__annotations__) == {
        "alert", "state", "severity", "run", "rank", "step", "time", "summary", "started_at", "fingerprint"}
    assert not Alert.__required_keys__ & Alert.__optional_keys__


def test_the_store_copies_alert_fields_into_the_columns_of_the_same_name(tmp_path: Path) -> None:
    assert set(ALERT_COLUMNS) <= Alert.__required_keys__ | Alert.__optional_keys__
    store = Store(str(tmp_path / "a.db"))
    store.close()
    with sqlite3.connect(tmp_path / "a.db") as db:
        columns = {row[1] for row in db.execute("PRAGMA table_info(alerts)")}
    assert set(ALERT_COLUMNS) <= columns
