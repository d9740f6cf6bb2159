"""How a rank's process ends, as the sidecar hears it: real Python processes with the client, writing to
the offline .jsonl sink (the same records the HTTP sink sends).

A normal exit sends ``end`` "completed" without ``tm.end()``; an uncaught exception in the main thread or
another thread sends ``end`` "failed" quoting it, and the hooks installed before still run; a SIGTERM sends
``end`` "failed" with ``signal`` "SIGTERM", even while the training thread is blocked in a C call, and the
process still dies by SIGTERM (unless someone else handles SIGTERM, or the setting is off); SIGKILL or
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


@pytest.mark.parametrize("how", ["os.kill(os.getpid(), signal.SIGKILL)", "os._exit(13)"])
def test_sigkill_or_os_exit_sends_no_end(tmp_path, how):
    done, records = run(tmp_path, f"tm.flush(5)\n{how}\n")
    assert done.returncode in (-signal.SIGKILL, 13)
    assert [r["step"] for r in records if r["type"] == "sample"] == [1, 2, 3] and ends(records) == []


# -- SIGTERM (trainer/sigterm.py) ------------------------------------------------------------------------
# The main thread blocked for good in a C call that a signal does not end: a second lock of a default
# pthread mutex waits in the kernel, and goes back to waiting after a signal handler ran (as a gloo or NCCL
# collective's wait, a CUDA sync do): Python's own handler never gets to run.
# "ready" comes once the main thread is in that call: its frame on the call's line and its task asleep, twice
# 50 ms apart (a wait for the GIL there would have ended while this thread slept).
BLOCKED_IN_C = """
import ctypes
mutex = ctypes.create_string_buffer(64)  # zeroed: PTHREAD_MUTEX_INITIALIZER
libc = ctypes.CDLL(None)
libc.pthread_mutex_lock(mutex)
main = threading.main_thread()

def in_the_call():
    frame = sys._current_frames().get(main.ident)
    with open(f"/proc/self/task/{main.native_id}/stat") as f:
        state = f.read().rsplit(")", 1)[1].split()[0]
    return frame is not None and frame.f_lineno == LINE and state == "S"

def say_ready():
    while not (in_the_call() and not time.sleep(0.05) and in_the_call()):
        time.sleep(0.01)
    print("ready", flush=True)

LINE = sys._getframe().f_lineno + 2
threading.Thread(target=say_ready, daemon=True).start()
libc.pthread_mutex_lock(mutex)
"""
BUSY_IN_PYTHON = """
print("ready", flush=True)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    sum(range(100))
"""


def signalled(tmp_path: Path, body: str, prelude: str = PRELUDE,
              env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """Start the script, SIGTERM it once it printed "ready", and wait for it (as torchrun stops a worker)."""
    out = tmp_path / "records.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", prelude + textwrap.dedent(body), str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", **(env or {})})
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n", proc.communicate(timeout=30)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    records = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), records


@pytest.mark.parametrize("body", [BLOCKED_IN_C, BUSY_IN_PYTHON], ids=["blocked-in-c", "busy-in-python"])
def test_a_sigterm_sends_end_failed_and_the_process_still_dies_by_sigterm(tmp_path, body):
    done, records = signalled(tmp_path, "tm.flush(5)\n" + body)
    assert done.returncode == -signal.SIGTERM, done.stderr
    (end,) = ends(records)
    assert {k: end[k] for k in ("status", "signal", "step")} == {"status": "failed", "signal": "SIGTERM", "step": 3}
    assert "error" not in end and "signal_forwarded" not in end
    assert records[-1] is end and [r["step"] for r in records if r["type"] == "sample"] == [1, 2, 3]
    assert done.stderr == "", done.stderr  # no traceback, no warning: it dies as it would have


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_sigterm_handler_of_the_users_is_left_alone(tmp_path, when):
    # Lightning, accelerate, a Slurm requeue handler: theirs decides. Installed after the client, ours stands
    # down: its thread hears the signal at once, but the user's handler runs and takes its time; it chains to
    # the handler it found, as Lightning's does (ours, then: it does nothing when called so).
    mine = ("prev = signal.getsignal(signal.SIGTERM)\n"
            "signal.signal(signal.SIGTERM, lambda *a: (callable(prev) and prev(*a), time.sleep(1.0), os._exit(7)))\n")
    before = mine if when == "before" else ""
    prelude = PRELUDE.replace("from trainhealth import Telemetry\n", f"from trainhealth import Telemetry\n{before}")
    done, records = signalled(tmp_path, ("tm.flush(5)\n" + (mine if when == "after" else "")
                                         + "assert signal.getsignal(signal.SIGTERM).__name__ == '<lambda>'\n"
                                         + BUSY_IN_PYTHON), prelude=prelude)
    assert done.returncode == 7, done.stderr
    assert ends(records) == [] and [r["step"] for r in records if r["type"] == "sample"] == [1, 2, 3]


def test_report_sigterm_off_leaves_sigterm_to_its_default(tmp_path):
    prelude = PRELUDE.replace("environ={})", "environ={}, report_sigterm=False)")
    done, records = signalled(tmp_path, "tm.flush(5)\nassert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL\n"
                              + BUSY_IN_PYTHON, prelude=prelude)
    assert done.returncode == -signal.SIGTERM and ends(records) == [], done.stderr


def test_under_trainhealth_launch_the_client_leaves_sigterm_to_the_launcher(tmp_path):
    # the launcher hands its launch id to its child: it reports the child's death itself (tests/integration/
    # test_launch.py, one end with signal_forwarded), so the client stands aside
    done, records = signalled(tmp_path, "tm.flush(5)\nassert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL\n"
                              + BUSY_IN_PYTHON, prelude=PRELUDE.replace("environ={}", "environ=dict(os.environ)"),
                              env={"TRAINHEALTH_LAUNCH_ID": "9f2c41d07a3be815"})
    assert done.returncode == -signal.SIGTERM and ends(records) == [], done.stderr


def test_a_forked_child_dies_by_sigterm_silently_and_close_gives_sigterm_back(tmp_path):
    done, records = run(tmp_path, """
        import warnings
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() in a process with threads (3.12+)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # a DataLoader worker: SIGTERM's default again, no wakeup fd of the parent's
            os.close(read)
            ok = signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and signal.set_wakeup_fd(-1) == -1
            os.write(write, b"1" if ok else b"0")
            time.sleep(60)
            os._exit(0)
        os.close(write)
        assert os.read(read, 1) == b"1"
        os.kill(pid, signal.SIGTERM)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == -signal.SIGTERM
        time.sleep(0.3)  # the parent's thread would have acted on a byte from the child by now
        tm.record(4, loss=0.5)
        assert signal.getsignal(signal.SIGTERM).__name__ == "_on_sigterm"
        tm.end()
        tm.close()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and signal.set_wakeup_fd(-1) == -1
        print("closed", flush=True)
    """)
    assert done.returncode == 0 and "closed" in done.stdout, done.stderr
    assert [(r["type"], r.get("status")) for r in records if r["type"] != "sample"] == [("end", "completed")]


def test_other_signals_on_the_wakeup_fd_are_ignored(tmp_path):
    # every signal with a Python handler writes its number to the wakeup fd (SIGINT's, a SIGCHLD handler's)
    done, records = run(tmp_path, """
        got = []
        signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.3)  # our thread has read the byte by now
        assert got == [1] and signal.getsignal(signal.SIGTERM).__name__ == "_on_sigterm"
    """)
    assert done.returncode == 0, done.stderr
    assert [r["status"] for r in ends(records)] == ["completed"]
