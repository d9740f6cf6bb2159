"""A forked child (a DataLoader worker with the fork start method) inherits the Telemetry object but not
its threads: using it there must neither hang nor send on the parent's connection."""

from __future__ import annotations

import os
import sys
import time
import warnings

import pytest
from trainhealth.trainer.client import Telemetry

from .trainer_fakes import ENV, FakeSender

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX only")


def _fork() -> int:
    with warnings.catch_warnings():  # 3.12+ warns about fork() in a process with threads
        warnings.simplefilter("ignore", DeprecationWarning)
        return os.fork()


def _wait(pid: int, seconds: float) -> int | None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return None


def test_forked_child_records_and_closes_without_hanging_while_the_parent_held_the_lock() -> None:
    sink = FakeSender()
    tm = Telemetry(environ=ENV, sink=sink, probes=[], flush_seconds=0.05, heartbeat_seconds=0.05)
    try:
        tm.record(1, loss=1.0)
        read_fd, write_fd = os.pipe()
        with tm._outbox._lock:  # one of the client's threads holds the buffer's lock at the fork
            pid = _fork()
            if pid == 0:  # the child: report what happened, never return into pytest
                code = 1
                try:
                    os.close(read_fd)
                    before = len(sink.batches)
                    tm.record(2, loss=2.0)
                    tm.heartbeat()
                    tm.close(timeout=5.0)
                    os.write(write_fd, f"sent={len(sink.batches) - before}".encode())
                    code = 0
                finally:
                    sys.stdout.flush()
                    os._exit(code)
        os.close(write_fd)
        exit_code = _wait(pid, 10.0)
        report = os.read(read_fd, 100).decode()
        os.close(read_fd)
        assert exit_code == 0, "the forked child hung on the inherited Telemetry"
        assert report == "sent=0"  # the child sent nothing on the parent's connection
        tm.record(3, loss=3.0)  # the parent carries on
        assert tm.flush(5.0)
        assert [r["step"] for r in sink.records if r["type"] == "sample"] == [1, 3]
    finally:
        tm.close()
