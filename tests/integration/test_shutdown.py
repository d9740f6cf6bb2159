"""Stopping the real sidecar: Ctrl-C and SIGTERM shut it down cleanly and quickly, the store closed."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest

from tests.integration.alerting import Receiver, ingest, oom_records

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stop_signal_mid_delivery_shuts_down_cleanly_and_keeps_the_outbox(start_sidecar, tmp_path: Path,
                                                                          sig: signal.Signals) -> None:
    receiver = Receiver().start()
    receiver.hold()  # a delivery is in flight when the signal comes
    db = tmp_path / "stop.db"
    sc = start_sidecar("--db", str(db), "--webhook", f"{receiver.url}/hook", db=False)
    try:
        assert ingest(sc, oom_records("stop", range(2)))["alerts"] == 2
        receiver.wait_for(lambda: receiver.in_flight == 1, what="a delivery in flight")
        sc.proc.send_signal(sig)
        try:
            rc = sc.proc.wait(10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"sidecar still running 10 s after {sig.name}")
        err = sc.stderr_text()
        assert "Traceback" not in err, err
        # Ctrl-C is how a person stops it: exit 0. SIGTERM: uvicorn re-raises it after the graceful
        # shutdown, so the process ends by the signal as supervisors expect.
        assert rc == (0 if sig == signal.SIGINT else -signal.SIGTERM)
        assert not Path(str(db) + "-wal").exists()  # the store was closed (last close removes the WAL)
    finally:
        receiver.release()
        receiver.stop()
    with sqlite3.connect(db) as conn:  # both notifications stay queued for the next start
        assert conn.execute("SELECT COUNT(*) FROM outbox").fetchone() == (2,)
