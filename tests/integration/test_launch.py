"""trainhealth.launch as a process (no sidecar: its offline .jsonl): it passes a signal on, reports the death
it caused as a stop, keeps stdout the child's own, and exits as the child did, so torchrun sees the same."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import python_path


def watch(tmp_path: Path, code: str) -> tuple[subprocess.Popen[bytes], Path]:
    out = tmp_path / "records.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINHEALTH_", "MASTER_", "TORCHELASTIC_"))}
    env.update({"PYTHONPATH": python_path(), "TRAINHEALTH_OFFLINE": str(out), "TRAINHEALTH_RUN": "solo", "RANK": "2"})
    proc = subprocess.Popen([sys.executable, "-m", "trainhealth.launch", "--", sys.executable, "-c", code], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    return proc, out


def test_a_signal_to_the_watcher_is_passed_on_once_and_its_death_reported_as_a_stop(tmp_path):
    proc, out = watch(tmp_path, "import signal, sys, time\n"
                                "n = []\n"
                                "signal.signal(signal.SIGTERM, lambda *a: n.append(1))\n"
                                "print('ready', flush=True)\n"
                                "time.sleep(1.0)\n"
                                "sys.stderr.write(f'got {len(n)}\\n')\n"
                                "signal.signal(signal.SIGTERM, signal.SIG_DFL)\n"
                                "import os; os.kill(os.getpid(), signal.SIGTERM)\n")
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"  # stdout: the child's own
    os.killpg(proc.pid, signal.SIGTERM)  # as torchrun stops a worker: to the watcher's group
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGTERM  # exits as the child did
    assert b"got 1\n" in err  # once: the child has its own group, the watcher passed it on
    (rec,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert {k: rec[k] for k in ("type", "run", "rank", "status", "signal", "signal_forwarded")} == {
        "type": "end", "run": "solo", "rank": 2, "status": "failed", "signal": "SIGTERM", "signal_forwarded": True}
    assert rec["stderr_tail"] == "got 1\n" and "step" not in rec


def test_a_clean_exit_sends_nothing_and_an_exit_code_is_kept(tmp_path):
    proc, out = watch(tmp_path, "import sys; sys.exit(0)")
    proc.communicate(timeout=30)
    assert proc.returncode == 0 and not out.exists()
    proc, out = watch(tmp_path, "import os; os._exit(7)")
    start = time.monotonic()
    proc.communicate(timeout=30)
    assert proc.returncode == 7 and time.monotonic() - start < 10
    (rec,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert (rec["exit_code"], rec["status"], "signal" in rec) == (7, "failed", False)


def test_a_client_under_the_watcher_leaves_sigterm_to_it_one_end(tmp_path):
    # the client stands aside under the launcher (TRAINHEALTH_LAUNCH_ID): the launcher's end is the only one
    proc, out = watch(tmp_path, "import signal, time\n"
                                "from trainhealth import Telemetry\n"
                                "tm = Telemetry()\n"
                                "tm.record(1, loss=0.5)\n"
                                "tm.flush(5)\n"
                                "assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL\n"
                                "print('ready', flush=True)\n"
                                "time.sleep(60)\n")
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGTERM, err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["type"], r.get("signal"), r.get("signal_forwarded")) for r in records if r["type"] != "sample"] == [
        ("end", "SIGTERM", True)], records
