"""The benchmarks' synthetic run stays valid input as the record contract evolves."""

from __future__ import annotations

import json

from trainhealth.ingest import decode_body

from benchmarks.common import Feed


def test_feed_bodies_decode_without_rejections_and_steps_advance() -> None:
    feed = Feed("bench", ranks=4)
    first = decode_body(feed.body(10), "application/json")
    second = decode_body(feed.body(10), "application/json")
    assert not first.rejected and not second.rejected
    assert [(r.rank, r.step) for r in first.records[:5]] == [(0, 0), (1, 0), (2, 0), (3, 0), (0, 1)]
    assert second.records[0].step == 2 and second.records[0].time > first.records[-1].time


def test_feed_body_matches_its_records_and_lines_are_ndjson() -> None:
    encoded, plain = Feed("x", ranks=3), Feed("x", ranks=3)
    assert json.loads(encoded.body(7)) == plain.records(7)
    lines = Feed("x", ranks=3).lines(5)
    assert lines.count(b"\n") == 5
    assert [r.step for r in decode_body(lines, "application/x-ndjson").records] == [0, 0, 0, 1, 1]


def test_a_feed_of_one_rank_carries_its_own_rank_number() -> None:
    records = decode_body(Feed("r", ranks=1, first_rank=7).body(2), "application/json").records
    assert [(r.rank, r.step) for r in records] == [(7, 0), (7, 1)]
