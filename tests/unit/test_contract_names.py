"""The client's copy of the contract's names equals the sidecar's (the client never imports the sidecar, so the
names are written twice; docs/record.md and docs/alerts.md are where both come from)."""

from __future__ import annotations

from trainhealth.detectors import ALL
from trainhealth.record import NUMBER_FIELDS, Record
from trainhealth.trainer import fields


def test_every_alert_the_client_can_stop_on_is_one_the_sidecar_raises_and_back():
    assert fields.ALERT_NAMES == {d.name for d in ALL}


def test_the_clients_top_level_sample_fields_are_record_fields_of_the_same_kind():
    record_fields = set(Record.__struct_fields__)
    assert fields.SAMPLE_FIELDS <= record_fields
    assert fields.FLOAT_FIELDS <= set(NUMBER_FIELDS)
    assert fields.INT_FIELDS <= record_fields


def test_every_number_field_of_a_sample_is_one_the_client_puts_top_level():
    # a number field the client does not know would go into `metrics` under its own name and never reach the
    # detector that reads it (start-only fields are sent by start(), not sorted by assign()).
    start_only = {"reference_lr"}
    assert set(NUMBER_FIELDS) - start_only <= fields.SAMPLE_FIELDS
