"""Exactly-once effect over at-least-once delivery, against the real sidecar (a process on a free port, its
flight recorder telling what it ingested): a frozen sidecar (SIGSTOP) makes the client's requests time out
while they still land later; the client resends each under its batch id and the sidecar takes it once.
A long answer is read whole, so it cannot be mistaken for the next answer."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from trainhealth.trainer.client import Telemetry
from trainhealth.trainer.transport import HttpSender

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def recorded(tmp_path: Path, run: str) -> list[dict]:
    path = tmp_path / "records" / f"{run}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_frozen_sidecar_gets_every_sample_once_though_timed_out_requests_land_later(start_sidecar, tmp_path):
    sidecar = start_sidecar("--record", str(tmp_path / "records"))
    tm = Telemetry(url=sidecar.url, run="frozen", environ={}, probes=[], timeout_seconds=0.3,
                   flush_seconds=0.05, backoff_seconds=0.05, max_backoff_seconds=0.2, heartbeat_seconds=60.0)
    steps = 300
    froze = threading.Event()

    def freeze() -> None:
        time.sleep(0.8)
        os.kill(sidecar.proc.pid, signal.SIGSTOP)
        froze.set()
        time.sleep(2.5)  # several timed-out attempts of the same batch wait in its sockets
        os.kill(sidecar.proc.pid, signal.SIGCONT)

    freezer = threading.Thread(target=freeze)
    freezer.start()
    try:
        for step in range(1, steps + 1):
            tm.record(step, loss=1.0 / step)
            time.sleep(0.01)
        freezer.join()
        assert froze.is_set()
        assert tm.flush(30)
    finally:
        os.kill(sidecar.proc.pid, signal.SIGCONT)
        tm.close()
    seen = Counter(r["step"] for r in recorded(tmp_path, "frozen") if r.get("type", "sample") == "sample")
    assert sorted(seen) == list(range(1, steps + 1))  # none lost
    assert max(seen.values()) == 1  # none ingested twice
    stats = tm.stats()
    assert stats["failures"] >= 2 and stats["duplicates"] >= 1  # the resends really had landed before


def test_an_answer_listing_many_rejections_is_read_whole_and_the_next_batch_goes_once(start_sidecar, tmp_path):
    sidecar = start_sidecar("--record", str(tmp_path / "records"))
    sink = HttpSender(sidecar.url)
    t0 = time.time()
    bad = [{"run": "long", "rank": -1, "time": t0, "step": i} for i in range(60)]
    first = sink.send([*bad, {"run": "long", "rank": 0, "time": t0, "step": 1}], "c/1")
    assert first.outcome == "ok" and first.answer is not None
    assert (first.answer["accepted"], first.answer["rejected"]) == (1, 60)
    assert len(json.dumps(first.answer)) > 2048  # more than the client used to read
    second = sink.send([{"run": "long", "rank": 0, "time": t0 + 1, "step": 2}], "c/2")
    assert second.outcome == "ok" and second.answer == {"accepted": 1, "rejected": 0, "alerts": 0}
    again = sink.send([{"run": "long", "rank": 0, "time": t0 + 1, "step": 2}], "c/2")
    assert again.answer == {"accepted": 0, "rejected": 0, "alerts": 0, "duplicate": True}
    sink.close()
    assert [r["step"] for r in recorded(tmp_path, "long")] == [1, 2]
