"""How a rank's process ends, as the sidecar hears it: real Python processes with the client, writing to
the offline .jsonl sink (the same records the HTTP sink sends).

A normal exit sends ``end`` "completed" without ``tm.end()``; an uncaught exception in the main thread or
another thread sends ``end`` "failed" quoting it, and the hooks installed before still run; a signal or
``os._exit`` sends nothing (silence, for the stall detector)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration

PRELUDE = """
import os, signal, sys, threading, time
from trainhealth import Telemetry
tm = Telemetry(run="exit", offline_path=sys.argv[1], environ={})
for step in range(1, 4):
    tm.record(step, loss=0.5)
"""


def run(tmp_path: Path, body: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess, list[dict]]:
    out = tmp_path / "records.jsonl"
    script = PRELUDE + textwrap.dedent(body)
    done = subprocess.run([sys.executable, "-c", script, str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    records = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    return done, records


def ends(records: list[dict]) -> list[dict]:
    return [r for r in records if r["type"] == "end"]


def test_a_normal_exit_sends_end_completed_without_tm_end(tmp_path):
    done, records = run(tmp_path, "")
    assert done.returncode == 0, done.stderr
    assert [(r["status"], r["step"]) for r in ends(records)] == [("completed", 3)]
    assert records[-1]["type"] == "end"  # after every sample


def test_sys_exit_with_a_code_is_still_a_normal_exit(tmp_path):
    done, records = run(tmp_path, "sys.exit(3)")
    assert done.returncode == 3
    assert [r["status"] for r in ends(records)] == ["completed"]


def test_tm_end_then_exit_sends_one_end(tmp_path):
    done, records = run(tmp_path, "tm.end()")
    assert done.returncode == 0 and [r["status"] for r in ends(records)] == ["completed"]


def test_an_uncaught_exception_is_quoted_and_the_earlier_hook_still_runs(tmp_path):
    done, records = run(tmp_path, """
        previous = sys.excepthook
        def mine(*args):
            print("EARLIER HOOK RAN", file=sys.stderr)
        # installed after the client: the client's hook is chained from it, so both run either way
        sys.excepthook = lambda *a: (mine(*a), previous(*a))
        def forward():
            raise RuntimeError("CUDA error: unspecified launch failure")
        forward()
    """)
    assert done.returncode == 1
    assert "EARLIER HOOK RAN" in done.stderr and "Traceback" in done.stderr  # the traceback still printed
    [end] = ends(records)
    assert (end["status"], end["step"]) == ("failed", 3)
    assert end["error"]["type"] == "RuntimeError"
    assert end["error"]["message"] == "CUDA error: unspecified launch failure"
    assert end["error"]["traceback"].splitlines()[-1] == "RuntimeError: CUDA error: unspecified launch failure"
    assert "in forward" in end["error"]["traceback"]


def test_a_hook_installed_before_the_client_is_chained(tmp_path):
    out = tmp_path / "records.jsonl"
    script = ("import sys\nsys.excepthook = lambda *a: print('EARLIER HOOK RAN', file=sys.stderr)\n"
              + PRELUDE + "raise ValueError('bad batch')\n")
    done = subprocess.run([sys.executable, "-c", script, str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert "EARLIER HOOK RAN" in done.stderr
    [end] = ends([json.loads(line) for line in out.read_text().splitlines()])
    assert (end["status"], end["error"]["type"], end["error"]["message"]) == ("failed", "ValueError", "bad batch")


def test_a_long_traceback_is_bounded_to_its_last_frames(tmp_path):
    done, records = run(tmp_path, """
        def down(n):
            if n == 0:
                raise KeyError("deep " + "x" * 10000)
            down(n - 1)
        down(200)
    """)
    [end] = ends(records)
    error = end["error"]
    assert len(error["traceback"]) <= 16_004 and len(error["message"]) == 4000
    text = error["traceback"]
    assert text.startswith("Traceback (most recent call last):")  # whole frames, not a cut line
    assert "<module>" not in text and "in down" in text  # the last frames (where it happened), not the first


def test_an_exception_in_another_thread_is_quoted_with_the_thread_name(tmp_path):
    done, records = run(tmp_path, """
        def load():
            raise OSError("DataLoader worker pipe broken")
        t = threading.Thread(target=load, name="prefetch")
        t.start(); t.join()
        os._exit(0)  # whatever the main thread does next, the thread's crash was sent already
    """)
    [end] = ends(records)
    assert (end["status"], end["error"]["type"], end["error"]["message"]) == (
        "failed", "OSError", "DataLoader worker pipe broken")
    assert end["error"]["traceback"].startswith("in thread 'prefetch':\n")


def test_a_thread_crash_then_more_training_ends_completed(tmp_path):
    done, records = run(tmp_path, """
        t = threading.Thread(target=lambda: 1 / 0, name="side")
        t.start(); t.join()
        tm.record(4, loss=0.5)
    """)
    assert [r["status"] for r in ends(records)] == ["failed", "completed"]


def test_a_cuda_oom_crash_keeps_its_oom_record(tmp_path):
    pytest.importorskip("torch")
    done, records = run(tmp_path, """
        import torch
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    """)
    kinds = [r["type"] for r in records if r["type"] in ("oom", "end")]
    assert kinds == ["oom", "end"]
    oom, end = [r for r in records if r["type"] in ("oom", "end")]
    assert oom["message"] == "CUDA out of memory. Tried to allocate 2.00 GiB"
    assert (end["status"], end["error"]["type"]) == ("failed", "torch.OutOfMemoryError")


@pytest.mark.parametrize("how", ["os.kill(os.getpid(), signal.SIGTERM)", "os._exit(13)"])
def test_a_signal_or_os_exit_sends_no_end(tmp_path, how):
    done, records = run(tmp_path, f"tm.flush(5)\n{how}\n")
    assert done.returncode in (-signal.SIGTERM, 13)
    assert [r["step"] for r in records if r["type"] == "sample"] == [1, 2, 3] and ends(records) == []
