"""The detectors' journal as a file beside the database (``DB.journal``, checkpoint.py): a frame torn by a kill
mid-write is cut off and costs only its own batch; a kill between a snapshot's commit and the file's truncation
replays nothing twice; a failed write is counted and leaves no partial frame behind; an older version's journal
rows (the ``pipeline_journal`` table) are still replayed, before the file's frames; while snapshots fail, the
file keeps only its newest ``MAX_JOURNAL_ROWS`` frames."""

from __future__ import annotations

import json
import math
import os
import shutil
import sqlite3
import time
from pathlib import Path

import pytest
from trainhealth import checkpoint
from trainhealth.assembly import build_service
from trainhealth.checkpoint import MSGPACK, TEXTS, Checkpoint, _encode
from trainhealth.config import load
from trainhealth.ingest import Decoder
from trainhealth.pipeline import Pipeline

from tests.unit.test_checkpoint import feed, restored, settings, shown, trace


def fed_pipeline(events: list) -> Pipeline:
    p = Pipeline(settings())
    feed(p, events)
    return p


def test_a_frame_torn_by_a_kill_costs_only_its_batch_and_is_cut_off(tmp_path: Path) -> None:
    events = trace()[:60]
    db = tmp_path / "state.db"
    p = Pipeline(settings())
    cp = Checkpoint(str(db))
    feed(p, events, cp)
    cp.close()
    journal = Path(f"{db}.journal")
    size = journal.stat().st_size
    os.truncate(journal, size - 100)  # the last batch's frame, cut mid-write
    q, unsent = restored(tmp_path, [], now=events[-1][2])
    assert q.records_processed == fed_pipeline(events[:-1]).records_processed == p.records_processed - 4
    again = Checkpoint(str(db))  # the torn frame is gone before anything follows it
    whole = again.size
    assert journal.stat().st_size == whole < size - 100
    again.fed(events[-1][1], events[-1][2], float("-inf"))
    again.close()
    q, _ = restored(tmp_path, [], now=events[-1][2])
    assert q.records_processed == p.records_processed


def test_a_kill_between_the_snapshot_and_the_truncation_replays_nothing_twice(tmp_path: Path) -> None:
    events = trace()
    db = tmp_path / "state.db"
    p = Pipeline(settings())
    cp = Checkpoint(str(db))
    sent = feed(p, events[:100], cp)
    shutil.copy(f"{db}.journal", tmp_path / "before")
    cp.snapshot(p, events[99][2])
    assert os.path.getsize(f"{db}.journal") == 0
    sent += feed(p, events[100:130], cp)
    cp.close()
    # as if killed after the snapshot's commit, before the file was cut: the covered frames are still there
    with open(f"{db}.journal", "rb") as fh:
        after = fh.read()
    Path(f"{db}.journal").write_bytes((tmp_path / "before").read_bytes() + after)
    q, unsent = restored(tmp_path, [a for a in sent if a["state"] == "firing"][-1:], now=events[129][2])
    assert q.records_processed == p.records_processed
    assert shown(sent + feed(q, events[130:])) == shown(feed(Pipeline(settings()), events))


def test_a_failed_write_is_counted_leaves_whole_frames_and_the_next_write_works(tmp_path: Path) -> None:
    events = trace()[:30]
    db = tmp_path / "state.db"
    p = Pipeline(settings())
    cp = Checkpoint(str(db))
    feed(p, events[:20], cp)
    size = os.path.getsize(f"{db}.journal")
    writable, cp.fd = cp.fd, os.open(f"{db}.journal", os.O_RDONLY)  # every write now fails (EBADF)
    feed(p, events[20:25], cp)
    assert cp.errors == 5 and cp.fault.failing is not None and os.path.getsize(f"{db}.journal") == size
    os.close(cp.fd)
    cp.fd = writable
    feed(p, events[25:], cp)
    assert cp.fault.failing is None
    cp.close()
    q, _ = restored(tmp_path, [], now=events[-1][2])
    lost = sum(len(recs) for kind, recs, _ in events[20:25] if kind == "batch")
    assert q.records_processed == p.records_processed - lost


def test_an_older_versions_journal_rows_are_replayed_before_the_files_frames(tmp_path: Path) -> None:
    events = [e for e in trace()[:40] if e[0] == "batch"]
    db = tmp_path / "state.db"
    Checkpoint(str(db)).close()  # the tables
    with sqlite3.connect(db) as old:  # what a version before DB.journal left
        old.executemany("INSERT INTO pipeline_journal (wall, judge_after, records) VALUES (?, NULL, ?)",
                        [(wall, _encode(recs)) for _, recs, wall in events[:25]])
    cp = Checkpoint(str(db))
    assert cp.seq == 25
    p = Pipeline(settings())
    feed(p, events[:25])
    feed(p, events[25:], cp)
    cp.close()
    q, _ = restored(tmp_path, [], now=events[-1][2])
    assert q.records_processed == p.records_processed and q.findings("j") == p.findings("j")


def test_while_snapshots_fail_the_file_keeps_its_newest_frames(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checkpoint, "MAX_JOURNAL_ROWS", 10)
    events = [e for e in trace()[:60] if e[0] == "batch"]
    db = tmp_path / "state.db"
    p = Pipeline(settings())
    cp = Checkpoint(str(db))
    feed(p, events[:40], cp)
    cp.snapshot(p, events[39][2])  # a good one first: it goes when the journal is cut
    feed(p, events[40:], cp)
    p.detectors["j"][0].__dict__["callback"] = lambda: None  # the next snapshots cannot pickle
    cp.snapshot(p, events[-1][2])
    assert cp.errors == 1 and len(cp.frames) == 10
    cp.fed(events[-1][1], events[-1][2] + 1, float("-inf"))  # appends go on after the copy
    cp.close()
    q, _ = restored(tmp_path, [], now=events[-1][2] + 1)
    assert q.records_processed == sum(len(recs) for _, recs, _ in events[-10:]) + len(events[-1][1])


def test_texts_frames_give_back_the_records_nan_kept_mixed_with_msgpack_ones(tmp_path: Path) -> None:
    """With a flight recorder the Service hands the journal the records' JSON texts (ingest.Decoder's
    keep_texts): written as they came, read back by the decoder, NaN (a token or a string) still NaN."""
    body = b"\n".join([
        b'{"run":"t","rank":0,"time":1000.0,"type":"start","world_size":1}',
        b'{"step":1,"run":"t","rank":0,"time":1001.0,"loss":1.5,"unknown":[1,"x"]}',
        b'{"run":"t","rank":0,"time":1002.0,"step":2,"loss":NaN}',
        b'{"run":"t","rank":0,"time":1003.0,"step":3,"loss":"nan","grad_norm":-Infinity}'])
    decoded = Decoder(keep_texts=True).decode_body(body, "application/x-ndjson")
    assert decoded.texts is not None and len(decoded.records) == 4
    db = tmp_path / "state.db"
    live = Pipeline(settings())
    cp = Checkpoint(str(db))
    alerts = live.process(decoded.records[:2], wall=1001.0).alerts
    cp.fed(decoded.records[:2], 1001.0, float("-inf"), decoded.texts[:2])
    alerts += live.process(decoded.records[2:3], wall=1002.0).alerts
    cp.fed(decoded.records[2:3], 1002.0, float("-inf"))  # msgpack
    alerts += live.process(decoded.records[3:], wall=1003.0).alerts
    cp.fed(decoded.records[3:], 1003.0, float("-inf"), decoded.texts[3:])
    cp.close()
    q, unsent = restored(tmp_path, [], now=1003.0)
    assert [(a["alert"], a["state"]) for a in alerts] == [("nan_divergence", "firing")]
    assert shown(unsent) == shown(alerts)  # the store never got it: the replay raised it again
    assert q.records_processed == 4 and q.findings("t") == live.findings("t")


def test_a_served_sidecar_with_a_recorder_journals_texts_and_restores_from_them(tmp_path: Path) -> None:
    over = {"db": str(tmp_path / "s.db"), "record_dir": str(tmp_path / "rec")}
    service, _ = build_service(load(None, over, {}), keep_state=True)
    now = time.time()
    batch = [{"run": "s", "rank": r, "time": now, "step": 1, "loss": 1.0} for r in range(3)]
    assert service.ingest(json.dumps(batch).encode(), "application/json").body["accepted"] == 3
    nan = [{"run": "s", "rank": 1, "time": now + 0.5, "step": 2, "loss": math.nan}]
    assert service.ingest(json.dumps(nan).encode(), "application/json").body["alerts"] == 1  # NaN: msgpack
    assert isinstance(service.journal, Checkpoint)
    forms = [form for _, _, _, _, form, _ in service.journal._frames(read=False)]
    assert forms == [TEXTS, MSGPACK]
    # kill -9: nothing closed, no final snapshot; a second sidecar on the same files restores
    again, _ = build_service(load(None, over, {}), keep_state=True)
    try:
        assert again.pipeline.records_processed == 4
        assert again.pipeline.findings("s") == service.pipeline.findings("s")
    finally:
        again.close()
        service.close()  # (its final snapshot comes after the restore it would have spared)


def test_the_bound_counts_an_older_versions_rows_first_and_drops_the_oldest(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checkpoint, "MAX_JOURNAL_ROWS", 10)
    events = [e for e in trace()[:40] if e[0] == "batch"]
    db = tmp_path / "state.db"
    Checkpoint(str(db)).close()
    with sqlite3.connect(db) as old:
        old.executemany("INSERT INTO pipeline_journal (wall, judge_after, records) VALUES (?, NULL, ?)",
                        [(wall, _encode(recs)) for _, recs, wall in events[:6]])
    p = Pipeline(settings())
    cp = Checkpoint(str(db))
    feed(p, events[6:12], cp)  # 6 rows + 6 frames: 2 over the bound
    p.detectors["j"][0].__dict__["callback"] = lambda: None
    cp.snapshot(p, events[11][2])
    assert cp.db.execute("SELECT COUNT(*) FROM pipeline_journal").fetchone()[0] == 4 and len(cp.frames) == 6
    cp.close()
    q, _ = restored(tmp_path, [], now=events[11][2])
    assert q.records_processed == sum(len(recs) for _, recs, _ in events[2:12])
